"""How far re-trains of one recipe spread: each eval figure's standard deviation across versions
trained alike except for their seeds (`kiln seeds V V V ...`).

`kiln compare` tests whether two versions differ on paired items. Two seeds of one recipe are two
different models, so it stars real differences between them that say nothing about the recipe
(tiny's shipped bits per byte ranged over 0.046 across five seeds). With a recorded spread, each
eval figure's interval also holds one seed draw on each side (`paired.with_seed_spread`), so a
star means "beyond what re-training alone moves".

The spread is kept on the registered model as one tag, with the versions it came from.
"""

from __future__ import annotations

import getpass
import json
import statistics
import time

from pipeline.errors import KilnError
from pipeline.release import registry
from pipeline.tracking import client

TAG = "kiln.seed_spread"
MIN_RETRAINS = 3  # a standard deviation from two values has one degree of freedom: too few to say


def measure(uri: str, profile: str, versions: list[str]) -> dict:
    """{"versions", "sd": {figure: standard deviation}} over `versions`, which must be re-trains of
    one recipe: their runs' settings may differ only in seeds."""
    if len(set(versions)) < MIN_RETRAINS:
        raise KilnError(f"a seed spread needs at least {MIN_RETRAINS} different versions, not {len(set(versions))}")
    resolved = dict(registry.resolve(uri, profile, v) for v in dict.fromkeys(versions))
    if len(resolved) < MIN_RETRAINS:
        raise KilnError(f"a seed spread needs at least {MIN_RETRAINS} different versions (aliases named the same one)")
    _same_recipe(uri, profile, list(resolved))
    names = set.intersection(*({k for k in tags if k.startswith(registry.EVAL_TAG)} for tags in resolved.values()))
    sd = {n: statistics.stdev(float(tags[n]) for tags in resolved.values()) for n in sorted(names)}
    return {"versions": list(resolved), "sd": sd}


def record(uri: str, profile: str, versions: list[str]) -> dict:
    """Measure the spread over `versions` and keep it on the registered model for `kiln compare`."""
    spread = {**measure(uri, profile, versions), "who": getpass.getuser(), "when": time.time()}
    c, name = client(uri), registry.model_name(profile)
    registry._call(uri, "recording the seed spread", lambda: c.set_registered_model_tag(name, TAG, json.dumps(spread)))
    return spread


def stored(uri: str, profile: str) -> dict | None:
    """The spread `kiln seeds` recorded for the profile's registered model, if any."""
    c, name = client(uri), registry.model_name(profile)
    tags = registry._call(uri, "reading the registered model", lambda: c.get_registered_model(name).tags)
    return json.loads(tags[TAG]) if TAG in tags else None


def _same_recipe(uri: str, profile: str, versions: list[str]) -> None:
    """Refuse versions whose pipeline runs differ in a setting other than a seed (a data stage
    reused from an earlier run logs no settings of its own: only settings all runs logged count)."""
    c, name = client(uri), registry.model_name(profile)
    params = {}
    for v in versions:
        run_id = registry._call(uri, "reading the version", lambda v=v: c.get_model_version(name, v).run_id)
        params[v] = registry._call(uri, "reading the version's run", lambda r=run_id: c.get_run(r).data.params)
    first, *rest = versions
    for key in sorted(set.intersection(*(set(p) for p in params.values()))):
        if key.rsplit(".", 1)[-1] == "seed":
            continue
        for v in rest:
            if params[v][key] != params[first][key]:
                raise KilnError(
                    f"versions {first} and {v} differ in {key} ({params[first][key]} vs {params[v][key]}): "
                    "a seed spread needs re-trains of one recipe, differing only in seeds"
                )
