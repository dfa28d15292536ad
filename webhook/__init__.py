"""Docker Hub webhook receiver: health-gated redeploys with rollback."""
