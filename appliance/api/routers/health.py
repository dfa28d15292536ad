"""Is the appliance alive (``/livez``), and is it doing its job (``/health``)."""

from __future__ import annotations

from fastapi import APIRouter

from appliance import __version__
from appliance.api.schemas import CalibrationHealth, Health, HorizonHealth, ProblemOut, ProductHealth
from appliance.api.state import State
from appliance.candles import HOUR

router = APIRouter(tags=["health"])


@router.get("/livez")
async def livez() -> dict[str, bool]:
    """The process answers (for container health checks and as the benchmark's trivial endpoint)."""
    return {"alive": True}


@router.get("/health", response_model=Health)
async def health(state: State) -> Health:
    products = {}
    for product in state.settings.products:
        horizons = {}
        for g in state.settings.horizons:
            loaded = state.inference.serving_of(product, g)
            horizons[g] = HorizonHealth(
                model_version=loaded.manifest.version if loaded else None,
                pooled=bool(loaded and loaded.pooled),
                models=state.inference.models_of(product, g),
                prediction=state.predictor.missing.get((product, g)) or "ok",
                calibration=CalibrationHealth.of(c)
                if (c := state.inference.calibration_of(product, g))
                else None,
            )
        hourly = horizons.get(HOUR)
        products[product] = ProductHealth(
            data_age_s=state.data_age_s(product),
            model_version=hourly.model_version if hourly else None,
            models=hourly.models if hourly else [],
            prediction=state.predictor.why_not(product) or "ok",
            horizons=horizons,
        )
    connected = bool(state.ingest and state.ingest.connected)
    problems = [ProblemOut.of(p) for p in state.health.current()]
    incidents = [ProblemOut.of(p) for p in state.health.incidents()]
    ok = connected and not problems and all(p.prediction == "ok" for p in products.values())
    return Health(status="ok" if ok else "degraded", version=__version__, build=state.settings.build,
                  ingest_connected=connected, problems=problems, incidents=incidents,
                  products=products)  # fmt: skip
