"""Canary analysis: is the canary worse than production on the same live traffic, and what follows.

The gateway counts, per version, what its requests did (`VersionSample`): outcomes (5xx, timeouts),
answers (empty, repetitive), and per-request TTFT, latency, tokens/s and answer length; user
feedback's thumbs-down count joins when a feedback source exists. `analyze` runs one check per
figure, each a Wald sequential probability ratio test (SPRT) on a share of canary requests, as
Flagger's and Argo Rollouts' analyses judge a canary by stated thresholds on repeated looks:

- a rate (5xx, timeouts, empty answers, repetitive answers, thumbs-down): H0 "the canary's rate is
  production's" against H1 "it is production's plus `increase`" (production's rate is measured on
  the same traffic in the same window, floored at `rate_floor` so one event is not infinitely
  surprising);
- a tail (TTFT P95, latency P95, tokens/s, answer length): the share of canary requests beyond
  production's 95th percentile (5th for tokens/s and length, where lower is worse) scaled by a
  tolerance `ratio`; for the same distribution that share is at most 5%, H1 is 5% + `tail_increase`.

The SPRT stays valid however often it is looked at (the gateway looks every few seconds), with
error rates `alpha` (aborting a canary as good as production: split evenly over the checks, so the
whole analysis aborts a good canary with at most that chance) and `beta` (passing one that is worse
by the stated margin, per check). The decision, once both versions have `min_requests` finished requests:
abort when any check rejects H0, promote when every check accepted it, hold otherwise. A check
with too few values on either side (a feedback source with few votes, tokens/s of a canary that
answers nothing) says `n/a` and does not block.

`record_promotion` and `record_abort` carry a decision into the registry: production moved (or
not), the analysis as a JSON artifact of the version's run, tags on the version, and one event in
the model's history (`kiln history`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field

PASS, FAIL, UNDECIDED, NA = "pass", "fail", "undecided", "n/a"
PROMOTE, HOLD, ABORT = "promote", "hold", "abort"
TAIL_SHARE = 0.05  # the 95th (or 5th) percentile: the share beyond it under H0
MIN_TAIL_VALUES = 10  # fewer values than this on either side: the tail check says n/a


@dataclass(frozen=True)
class CanaryPolicy:
    """The stated thresholds of the analysis (the `KILN_CANARY_*` settings of `kiln serve`)."""

    min_requests: int = 50  # finished requests each version needs before any decision
    alpha: float = 0.05  # chance of aborting a canary as good as production, per check
    beta: float = 0.10  # chance of passing a canary worse by the margin below, per check
    error_increase: float = 0.02  # 5xx share: H1 is production's + this
    timeout_increase: float = 0.02
    empty_increase: float = 0.05
    repetition_increase: float = 0.10
    thumbs_down_increase: float = 0.10
    min_feedback: int = 20  # votes on the canary before thumbs-down is tested
    rate_floor: float = 0.01  # production's rate is taken as at least this
    latency_ratio: float = 1.5  # a canary request slower than 1.5 x production's P95 is a tail event
    ttft_ratio: float = 1.5
    tokens_per_s_ratio: float = 1.5  # slower than production's 5th percentile / 1.5
    answer_length_ratio: float = 2.0  # shorter than production's 5th percentile / 2
    tail_increase: float = 0.15  # tail share: H1 is 5% + this

    def __post_init__(self):
        if self.min_requests < 1:
            raise ValueError(f"min_requests={self.min_requests}: at least 1")
        for name in ("alpha", "beta"):
            if not 0 < getattr(self, name) < 0.5:
                raise ValueError(f"{name}={getattr(self, name)}: between 0 and 0.5")


@dataclass
class VersionSample:
    """What one version's requests did since the canary started."""

    version: str
    requests: int = 0  # finished requests routed to this version
    errors: int = 0  # 5xx other than timeouts
    timeouts: int = 0
    answers: int = 0  # 200 answers
    empty: int = 0
    repetitive: int = 0
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    answer_tokens: list[float] = field(default_factory=list)
    thumbs_down: int | None = None  # None: no feedback source
    votes: int | None = None


def sprt(k: int, n: int, p0: float, p1: float, alpha: float, beta: float) -> tuple[float, str]:
    """Wald's test of k events in n trials, H0: p = p0 against H1: p = p1 > p0. (log-likelihood ratio, verdict)."""
    llr = k * math.log(p1 / p0) + (n - k) * math.log((1 - p1) / (1 - p0))
    if llr >= math.log((1 - beta) / alpha):
        return llr, FAIL
    if llr <= math.log(beta / (1 - alpha)):
        return llr, PASS
    return llr, UNDECIDED


def quantile(values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation (numpy's default), of a non-empty list."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _rate_check(
    name: str, k: int, n: int, base_k: int, base_n: int, increase: float, policy: CanaryPolicy, alpha: float
) -> dict:
    base = base_k / base_n if base_n else 0.0
    p0 = max(base, policy.rate_floor)
    p1 = p0 + increase
    check = {"name": name, "production": round(base, 4), "canary": round(k / n, 4) if n else None, "n": n}
    check["threshold"] = f"rate > {p0:.3f} + {increase:g}"
    if n == 0 or p1 >= 1:  # production at the ceiling already: no worse rate to detect
        return {**check, "llr": 0.0, "verdict": NA}
    llr, verdict = sprt(k, n, p0, p1, alpha, policy.beta)
    return {**check, "llr": round(llr, 3), "verdict": verdict}


def _tail_check(name: str, canary: list[float], production: list[float], ratio: float, higher_is_worse: bool,
                policy: CanaryPolicy, alpha: float) -> dict:  # fmt: skip
    check = {"name": name, "n": len(canary)}
    if len(canary) < MIN_TAIL_VALUES or len(production) < MIN_TAIL_VALUES:
        return {**check, "production": None, "canary": None, "threshold": None, "llr": 0.0, "verdict": NA}
    q = 1 - TAIL_SHARE if higher_is_worse else TAIL_SHARE
    limit = quantile(production, q) * ratio if higher_is_worse else quantile(production, q) / ratio
    beyond = sum(1 for v in canary if (v > limit if higher_is_worse else v < limit))
    llr, verdict = sprt(beyond, len(canary), TAIL_SHARE, TAIL_SHARE + policy.tail_increase, alpha, policy.beta)
    return {
        **check, "production": round(quantile(production, q), 4), "canary": round(quantile(canary, q), 4),
        "threshold": f"{'>' if higher_is_worse else '<'} {limit:.4g} in over {TAIL_SHARE:.0%} of requests",
        "beyond": beyond, "llr": round(llr, 3), "verdict": verdict,
    }  # fmt: skip


def checks(canary: VersionSample, production: VersionSample, policy: CanaryPolicy) -> list[dict]:
    c, p = canary, production
    a = policy.alpha / (9 if c.votes is not None else 8)  # Bonferroni over the checks below
    out = [
        _rate_check("5xx_rate", c.errors, c.requests, p.errors, p.requests, policy.error_increase, policy, a),
        _rate_check("timeout_rate", c.timeouts, c.requests, p.timeouts, p.requests, policy.timeout_increase, policy, a),
        _rate_check("empty_rate", c.empty, c.answers, p.empty, p.answers, policy.empty_increase, policy, a),
        _rate_check(
            "repetition_rate", c.repetitive, c.answers, p.repetitive, p.answers, policy.repetition_increase, policy, a
        ),
        _tail_check("ttft_p95", c.ttft, p.ttft, policy.ttft_ratio, True, policy, a),
        _tail_check("latency_p95", c.latency, p.latency, policy.latency_ratio, True, policy, a),
        _tail_check("tokens_per_s", c.tokens_per_s, p.tokens_per_s, policy.tokens_per_s_ratio, False, policy, a),
        _tail_check("answer_length", c.answer_tokens, p.answer_tokens, policy.answer_length_ratio, False, policy, a),
    ]
    if c.votes is not None:  # a feedback source exists
        downs = _rate_check(
            "thumbs_down_rate", c.thumbs_down or 0, c.votes, p.thumbs_down or 0, p.votes or 0,
            policy.thumbs_down_increase, policy, a,
        )  # fmt: skip
        if c.votes < policy.min_feedback:
            downs["verdict"] = NA
        out.append(downs)
    return out


def summary(s: VersionSample) -> dict:
    """The figures of one version shown beside the checks."""

    def p95(xs):
        return round(quantile(xs, 0.95), 4) if xs else None

    def mean(xs):
        return round(sum(xs) / len(xs), 2) if xs else None

    failed = s.errors + s.timeouts
    return {
        "version": s.version, "requests": s.requests,
        "error_rate": round(failed / s.requests, 4) if s.requests else None,
        "errors_5xx": s.errors, "timeouts": s.timeouts, "answers": s.answers,
        "empty_rate": round(s.empty / s.answers, 4) if s.answers else None,
        "repetition_rate": round(s.repetitive / s.answers, 4) if s.answers else None,
        "ttft_p95_s": p95(s.ttft), "latency_p95_s": p95(s.latency), "tokens_per_s_mean": mean(s.tokens_per_s),
        "answer_tokens_mean": mean(s.answer_tokens),
        "thumbs_down_rate": round((s.thumbs_down or 0) / s.votes, 4) if s.votes else None,
    }  # fmt: skip


def analyze(canary: VersionSample, production: VersionSample, policy: CanaryPolicy) -> dict:
    """The analysis of the canary against production: every check and the decision with its reason."""
    result = {
        "canary": summary(canary), "production": summary(production), "policy": asdict(policy), "when": time.time(),
    }  # fmt: skip
    waiting = [s for s in (canary, production) if s.requests < policy.min_requests]
    if waiting:
        s = waiting[0]
        reason = f"version {s.version} has {s.requests} of the {policy.min_requests} requests needed"
        return {**result, "checks": [], "decision": HOLD, "reason": reason}
    found = checks(canary, production, policy)
    failed = [c for c in found if c["verdict"] == FAIL]
    open_ = [c for c in found if c["verdict"] == UNDECIDED]
    if failed:
        decision, reason = ABORT, "; ".join(_describe(c) for c in failed)
    elif open_:
        decision, reason = HOLD, "not yet decided: " + ", ".join(c["name"] for c in open_)
    else:
        decision, reason = PROMOTE, "every check passed: " + ", ".join(c["name"] for c in found if c["verdict"] == PASS)
    return {**result, "checks": found, "decision": decision, "reason": reason}


def _describe(check: dict) -> str:
    name, n = check["name"], check["n"]
    if "beyond" in check:
        return f"{name}: {check['beyond']} of {n} canary requests {check['threshold'].split(' in ')[0]}"
    return f"{name} {check['canary']:.3f} against production's {check['production']:.3f} ({n} answers)"


# ---------------------------------------------------------------- the registry


def _attach(c, name: str, version: str, analysis: dict, tags: dict[str, str]) -> str:
    """The analysis as a JSON artifact of the version's run, and `canary.*` tags on the version."""
    mv = c.get_model_version(name, version)
    path = f"canary/analysis-v{version}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.json"
    if mv.run_id:
        c.log_text(mv.run_id, json.dumps(analysis, indent=2), path)
    for key, value in {**tags, "canary.analysis": path, "canary.decided": f"{time.time():.0f}"}.items():
        c.set_model_version_tag(name, version, key, value)
    return path


def record_promotion(uri: str, profile: str, version: str, analysis: dict) -> dict:
    """Move `production` to the canary's version (its files verified), attach the analysis; the history
    event carries the decision."""
    from pipeline.release import registry
    from pipeline.tracking import client

    reason = f"canary analysis: {analysis['reason']}"
    event = registry.promote(uri, profile, version, note={"by": "canary", "reason": reason})
    c = client(uri)
    tags = {"canary.decision": PROMOTE, "canary.requests": str(analysis["canary"]["requests"])}
    name = registry.model_name(profile)
    registry.guarded(uri, "attaching the analysis", lambda: _attach(c, name, version, analysis, tags))
    return event


def record_abort(uri: str, profile: str, version: str, analysis: dict, reason: str) -> dict:
    """Tag the canary's version `canary_failed` with the reason, attach the analysis, log the event;
    production is not touched."""
    from pipeline.release import registry
    from pipeline.tracking import client

    c = client(uri)
    name = registry.model_name(profile)
    tags = {
        "canary_failed": reason[:5000], "canary.decision": ABORT, "canary.requests": str(analysis["canary"]["requests"])
    }  # fmt: skip
    registry.guarded(uri, "attaching the analysis", lambda: _attach(c, name, version, analysis, tags))
    production = analysis.get("production", {}).get("version")
    return registry.record_event(uri, profile, {"action": "abort", "from": production, "to": version, "reason": reason})
