"""Experience: the versioned pool, its extraction from trajectories, selection and injection."""
