"""How a node is assembled from services, per role: see roles.py."""
