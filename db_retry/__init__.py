"""db-retry."""
