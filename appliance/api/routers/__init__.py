"""One APIRouter per resource; ``appliance.api.app.create_app`` composes them."""
