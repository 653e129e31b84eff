"""Training-pair purification: naive, IPv1 and IPv2 strategies and the authors' PNG layout."""
