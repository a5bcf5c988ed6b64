"""The work: plain typed functions and thin Prefect task wrappers."""
