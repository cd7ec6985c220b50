"""From tables to findings: intervals and verdicts, aggregates, paired comparisons, claims,
minimality, and what the book shows of them (charts, the gallery, readable tables)."""
