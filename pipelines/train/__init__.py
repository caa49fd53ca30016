"""Ray Train training: one loop (``loop``) for every model kind, a task per kind (dit, vit, vae)."""
