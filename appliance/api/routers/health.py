"""Is the appliance alive (``/livez``), and is it doing its job (``/health``)."""

from __future__ import annotations

from fastapi import APIRouter

from appliance import __version__
from appliance.api.schemas import Health, ProblemOut, ProductHealth
from appliance.api.state import State

router = APIRouter(tags=["health"])


@router.get("/livez")
async def livez() -> dict[str, bool]:
    """The process answers (for container health checks and as the benchmark's trivial endpoint)."""
    return {"alive": True}


@router.get("/health", response_model=Health)
async def health(state: State) -> Health:
    products = {}
    for product in state.settings.products:
        loaded = state.inference.serving_of(product)
        missing = state.predictor.missing.get(product)
        products[product] = ProductHealth(
            data_age_s=state.data_age_s(product),
            model_version=loaded.manifest.version if loaded else None,
            models=state.inference.models_of(product),
            prediction=missing or "ok",
        )
    connected = bool(state.ingest and state.ingest.connected)
    problems = [ProblemOut.of(p) for p in state.health.current()]
    ok = connected and not problems and all(p.prediction == "ok" for p in products.values())
    return Health(status="ok" if ok else "degraded", version=__version__, build=state.settings.build,
                  ingest_connected=connected, problems=problems, products=products)  # fmt: skip
