"""From tables to findings: intervals and verdicts, aggregates, paired comparisons, claims,
minimality, charts."""
