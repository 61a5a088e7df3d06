"""saev's grouping sweeper for Hydra (the class must live under `hydra_plugins`; its logic is
`saev.sweep`)."""
