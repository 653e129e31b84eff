"""Image analysis on HU volumes: masks, metrics and metric tables, noise estimate, classical filters."""
