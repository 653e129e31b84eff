"""CT physics: the fast parallel/fan projector and the projection-domain low-dose simulator."""
