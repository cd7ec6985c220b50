"""From the run folder's tables to what the book shows: statistics, aggregates, figures."""
