"""Every answer the gateway serves, recorded as an MLflow trace, without slowing or failing a request.

A request that finishes (answered, failed or cut off) hands one `TraceRecord` to the `TraceWriter`:
a bounded queue that a child process at the lowest CPU priority empties into the tracking store.
The request path does only that hand-off (and, for a stream, keeps the bytes it relays, up to
STREAM_KEEP); parsing the answer, masking it and writing it happen in the child, off the gateway's
GIL and behind the replicas on the CPU. When the queue is full (the store or the machine is busy)
the record is dropped and counted in `kiln_traces_dropped_total{reason="queue_full"}`; a write the
store refuses is counted with `reason="store_error"`. KILN_TRACE_SAMPLE (0..1, default 1) is the
share of requests traced; an untraced response carries no trace id.

The trace id (`tr-` and 32 hex digits, MLflow's form) is chosen when the response starts, so every
traced response carries it (`X-Kiln-Trace-Id`, and the `id` of an OpenAI answer or of each of its
streamed chunks) before the trace is written. The trace goes to the experiment
`<registered model>-serving` of the store the served model comes from, with one root span (the
route): inputs the masked request, outputs `{"text": the masked answer}`, and as metadata the
route, preset, sampler values, model, version, alias and role, token counts, queue/TTFT/total ms,
finish reason, status and the API key's id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field

from prometheus_client import Counter

from pipeline.data.feedback import ROUTE_KEY, serving_experiment
from pipeline.data.pii import mask_pii

log = logging.getLogger("kiln.serve.tracing")
TRACE_HEADER = "X-Kiln-Trace-Id"
STREAM_KEEP = 256 * 1024  # bytes of a streamed answer kept for its trace
BATCH = 64  # records written per store call
SAMPLER_KEYS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "n_predict", "max_tokens", "seed")
PREVIEW_CHARS = 1000


_CHUNK_ID = re.compile(rb'"id":"[^"]*"')  # llama-server writes its OpenAI chunks without spaces


def new_trace_id() -> str:
    return f"tr-{uuid.uuid4().hex}"


@dataclass
class TraceRecord:
    """What the request path knows when it finishes; the writer process makes the trace of it."""

    trace_id: str
    route: str
    request_id: str
    key_id: str | None
    status: int
    started_ns: int  # wall clock
    total_ms: float
    queue_ms: float
    ttft_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    preset: str | None
    sent: dict  # the body sent upstream (masked input, sampler values)
    model: str | None
    version: str | None
    alias: str | None
    role: str | None
    error: str | None = None
    answer: dict | None = None  # a JSON answer as the route returned it
    stream: bytes = b""  # a streamed answer as llama-server sent it
    extra: dict = field(default_factory=dict)


class TraceWriter:
    """The bounded queue and the process that writes its records to MLflow.

    The writing (building the spans, masking, the store's SQL) costs ~15 ms of CPU a trace, so it
    runs in a child process at the lowest CPU priority (SCHED_IDLE by default: even at niceness 19
    it took enough of the replicas' cores to cost a fifth of the tokens/s at 16 clients on 2 cores):
    it holds neither the gateway's GIL nor the cores the replicas need, and when they are busy it
    falls behind, the queue fills and traces are dropped (counted) instead of answers slowed. The
    child reports each batch back; a thread here keeps the counters and wakes `wait_written`."""

    def __init__(
        self, uri: str, sample: float, capacity: int, registry, start: bool = True, priority: str = "idle"
    ) -> None:
        """`start=False` leaves the queue unread until `start()`: a store that takes nothing yet.
        `priority`: the writer's CPU priority (`lower_priority`)."""
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no fork of a process with running threads
        self.uri, self.sample = uri, sample
        self.queue = ctx.Queue(maxsize=capacity)
        self._results = ctx.Queue()
        # at exit a queue joins its feeder thread, which blocks for good writing to a pipe nobody reads
        # (the writer gone, stopped or never started, this process holding the pipe's other end): what
        # is left unwritten then is lost either way, so exit does not wait for it. close() flushes.
        self.queue.cancel_join_thread()
        self._results.cancel_join_thread()
        self.written = Counter("kiln_traces_written", "served answers recorded as MLflow traces", registry=registry)
        self.dropped = Counter(
            "kiln_traces_dropped", "traces not recorded (queue_full: the store is slow; store_error)", ["reason"],
            registry=registry,
        )  # fmt: skip
        self._pending: set[str] = set()
        self._done = threading.Condition()
        self._process = ctx.Process(target=write_traces, args=(uri, self.queue, self._results, priority), daemon=True)
        self._reader = threading.Thread(target=self._read_results, name="kiln-trace-results", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        self._process.start()
        self._reader.start()

    def sampled(self) -> bool:
        return self.sample >= 1.0 or random.random() < self.sample

    def submit(self, record: TraceRecord) -> None:
        """Hand a record to the writer; never blocks (a full queue drops it, counted)."""
        with self._done:
            self._pending.add(record.trace_id)
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped.labels("queue_full").inc()
            self._settle([record.trace_id])

    def wait_written(self, trace_id: str, timeout: float) -> bool:
        """Block until `trace_id` is no longer waiting to be written (written or dropped), or `timeout`;
        False when it is still waiting."""
        deadline = time.monotonic() + timeout
        with self._done:
            while trace_id in self._pending and time.monotonic() < deadline:
                self._done.wait(deadline - time.monotonic())
            return trace_id not in self._pending

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (up to `timeout`), then stop the process."""
        if not self._process.is_alive():
            return
        with contextlib.suppress(queue.Full):
            self.queue.put(None, timeout=timeout)
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._results.put(None)
        self._reader.join(5)

    def _settle(self, ids: list[str]) -> None:
        with self._done:
            self._pending.difference_update(ids)
            self._done.notify_all()

    def _read_results(self) -> None:
        while True:
            result = self._results.get()
            if result is None:
                return
            ids, error = result
            if error is None:
                self.written.inc(len(ids))
            else:
                self.dropped.labels("store_error").inc(len(ids))
            self._settle(ids)


def lower_priority(priority: str) -> None:
    """This process's CPU priority: "idle" (Linux's SCHED_IDLE: the CPU only when no other process
    wants it; niceness 19 where there is no such policy) or a niceness, "0" to "19"."""
    if priority == "idle" and hasattr(os, "sched_setscheduler"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.nice(19 if priority == "idle" else int(priority))


def write_traces(uri: str, records, results, priority: str = "idle") -> None:
    """The writer process: batches of records from `records` into the store at `uri`; for each batch
    (its trace ids, None or the error) on `results`. At the lowest CPU priority by default
    (KILN_TRACE_NICE, idle): the replicas and the gateway come first."""
    lower_priority(priority)
    store = TraceStore(uri)
    last_warning = 0.0
    while True:
        first = records.get()
        if first is None:
            return
        batch = [first]
        while len(batch) < BATCH:
            try:
                more = records.get_nowait()
            except queue.Empty:
                break
            if more is None:
                records.put(None)  # stop after this batch
                break
            batch.append(more)
        error = None
        try:
            store.write(batch)
        except Exception as exc:  # the store is down or refused: the requests were answered anyway
            error = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            if time.monotonic() - last_warning > 30:
                last_warning = time.monotonic()
                log.warning("%d traces not recorded: %s", len(batch), error)
        results.put(([r.trace_id for r in batch], error))


class TraceStore:
    """Writes records as MLflow traces into one tracking store."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._experiments: dict[str, str] = {}
        self._client = None

    def _experiment(self, model: str) -> str:
        name = serving_experiment(model or "kiln")
        if name not in self._experiments:
            from pipeline.tracking import client, named_experiment

            self._experiments[name] = named_experiment(client(self.uri), name, self.uri)
        return self._experiments[name]

    def write(self, batch: list[TraceRecord]) -> None:
        from mlflow.tracing.constant import TraceTagKey

        from pipeline.data.feedback import tracing_client

        if self._client is None:
            self._client = tracing_client(self.uri)
        by_experiment: dict[str, list] = {}
        infos = []
        for record in batch:
            exp = self._experiment(record.model)
            span, info = trace_entities(record, exp)
            by_experiment.setdefault(exp, []).append(span)
            infos.append(info)
        # the trace first, then its spans: a trace the spans created first is merged field by field
        # (about twice the CPU); a tracking store keeps spans itself (sqlite and a server alike)
        for info in infos:
            info.tags[TraceTagKey.SPANS_LOCATION] = "TRACKING_STORE"
            self._client.start_trace(info)
        for exp, spans in by_experiment.items():
            self._client.log_spans(exp, spans)


def answer_of(record: TraceRecord) -> tuple[str, list[str], str | None]:
    """(the first answer's text, every answer's text, finish reason) from a JSON answer or a stream."""
    if record.answer is not None:
        return _from_json(record)
    return _from_stream(record.stream)


def _from_json(record: TraceRecord) -> tuple[str, list[str], str | None]:
    body = record.answer
    if "choices" in body:
        texts, finish = [], None
        for c in body.get("choices") or []:
            texts.append((c.get("message") or {}).get("content") or c.get("text") or "")
            finish = finish or c.get("finish_reason")
        return (texts[0] if texts else ""), texts, finish
    generated = body.get("generated_text", "")
    texts = generated if isinstance(generated, list) else [generated]
    limit = record.sent.get("n_predict")
    finish = "length" if limit and record.completion_tokens >= limit * len(texts) else "stop"
    return (texts[0] if texts else ""), texts, finish


def _from_stream(data: bytes) -> tuple[str, list[str], str | None]:
    pieces: dict[int, list[str]] = {}
    finish = None
    for line in data.split(b"\n"):
        if not line.startswith(b"data: {"):
            continue
        try:
            event = json.loads(line[6:])
        except ValueError:
            continue  # the kept bytes ended inside this event
        if "choices" in event:
            for c in event["choices"]:
                text = (c.get("delta") or {}).get("content") if "delta" in c else c.get("text")
                pieces.setdefault(c.get("index", 0), []).append(text or "")
                finish = c.get("finish_reason") or finish
        elif "content" in event:
            pieces.setdefault(0, []).append(event.get("content") or "")
            if event.get("stop"):
                finish = "length" if event.get("stop_type") == "limit" else "stop"
    texts = ["".join(pieces[i]) for i in sorted(pieces)]
    return (texts[0] if texts else ""), texts, finish


def request_inputs(sent: dict) -> dict:
    if isinstance(sent.get("messages"), list):
        return {"messages": sent["messages"]}
    return {"prompt": sent.get("prompt", "")}


def _preview(inputs: dict) -> str:
    if "messages" in inputs:
        last = inputs["messages"][-1].get("content") if inputs["messages"] else ""
        return (last if isinstance(last, str) else json.dumps(last))[:PREVIEW_CHARS]
    prompt = inputs["prompt"]
    return (prompt if isinstance(prompt, str) else json.dumps(prompt))[:PREVIEW_CHARS]


def _mask_inputs(inputs: dict) -> dict:
    """The routes mask what the model reads; masking again here covers anything they let through."""
    if "messages" in inputs:
        return {"messages": [{**m, "content": _mask_any(m.get("content"))} for m in inputs["messages"]]}
    return {"prompt": _mask_any(inputs["prompt"])}


def _mask_any(value):
    if isinstance(value, str):
        return mask_pii(value)[0]
    if isinstance(value, list):
        return [_mask_any(v) for v in value]
    if isinstance(value, dict):
        return {k: _mask_any(v) if k == "text" else v for k, v in value.items()}
    return value


def trace_entities(record: TraceRecord, experiment_id: str):
    """The MLflow root span and TraceInfo of one record."""
    from mlflow.entities import Span, TraceInfo, TraceLocation, TraceState
    from mlflow.tracing.constant import SpanAttributeKey, TraceMetadataKey, TraceTagKey

    answer, texts, finish = answer_of(record)
    answer, texts = mask_pii(answer)[0], [mask_pii(t)[0] for t in texts]
    inputs = _mask_inputs(request_inputs(record.sent))
    outputs = {"text": answer, **({"texts": texts} if len(texts) > 1 else {})}
    usage = {
        "input_tokens": record.prompt_tokens, "output_tokens": record.completion_tokens,
        "total_tokens": record.prompt_tokens + record.completion_tokens,
    }  # fmt: skip
    sampler = {k: record.sent[k] for k in SAMPLER_KEYS if k in record.sent}
    ok = record.status == 200 and record.error is None
    meta = {
        ROUTE_KEY: record.route, "kiln.request_id": record.request_id, "kiln.key_id": record.key_id or "",
        "kiln.model": record.model or "", "kiln.version": record.version or "", "kiln.alias": record.alias or "",
        "kiln.role": record.role or "", "kiln.preset": record.preset or "", "kiln.sampler": json.dumps(sampler),
        "kiln.status": str(record.status), "kiln.finish_reason": finish or "",
        "kiln.prompt_tokens": str(record.prompt_tokens), "kiln.completion_tokens": str(record.completion_tokens),
        "kiln.queue_ms": f"{record.queue_ms:.1f}",
        "kiln.ttft_ms": "" if record.ttft_ms is None else f"{record.ttft_ms:.1f}",
        "kiln.total_ms": f"{record.total_ms:.1f}", TraceMetadataKey.TOKEN_USAGE: json.dumps(usage),
    }  # fmt: skip
    if record.error:
        meta["kiln.error"] = record.error[:500]
    end_ns = record.started_ns + int(record.total_ms * 1e6)
    attributes = {
        SpanAttributeKey.REQUEST_ID: json.dumps(record.trace_id),
        SpanAttributeKey.SPAN_TYPE: json.dumps("CHAT_MODEL" if "messages" in inputs else "LLM"),
        SpanAttributeKey.INPUTS: json.dumps(inputs, ensure_ascii=False),
        SpanAttributeKey.OUTPUTS: json.dumps(outputs, ensure_ascii=False),
        SpanAttributeKey.CHAT_USAGE: json.dumps(usage),
        **{k: json.dumps(v) for k, v in meta.items() if k.startswith("kiln.")},
    }
    span = Span.from_dict({
        "trace_id": _b64(int(record.trace_id[3:], 16), 16), "span_id": _b64(random.getrandbits(64) or 1, 8),
        "parent_span_id": None, "name": record.route, "start_time_unix_nano": record.started_ns,
        "end_time_unix_nano": end_ns, "events": [],
        "status": {"code": "STATUS_CODE_OK" if ok else "STATUS_CODE_ERROR", "message": record.error or ""},
        "attributes": attributes,
    })  # fmt: skip
    info = TraceInfo(
        trace_id=record.trace_id, trace_location=TraceLocation.from_experiment_id(experiment_id),
        request_time=record.started_ns // 1_000_000, state=TraceState.OK if ok else TraceState.ERROR,
        request_preview=_preview(inputs), response_preview=answer[:PREVIEW_CHARS],
        execution_duration=int(record.total_ms), client_request_id=record.request_id, trace_metadata=meta,
        tags={TraceTagKey.TRACE_NAME: record.route, "kiln.version": record.version or "",
              "kiln.alias": record.alias or ""},
    )  # fmt: skip
    return span, info


def _b64(value: int, size: int) -> str:
    import base64

    return base64.b64encode(value.to_bytes(size, "big")).decode()


class Tracing:
    """The gateway's side: which requests are traced, their ids and headers, the hand-off to the writer.
    Off (every method a no-op) when the served model has no tracking store or KILN_TRACE_SAMPLE is 0."""

    def __init__(self, settings, deployment, registry) -> None:
        self.deployment = deployment
        self.uri: str | None = getattr(deployment.target, "tracking_uri", None)
        on = self.uri is not None and settings.kiln_trace_sample > 0
        sample, capacity = settings.kiln_trace_sample, settings.kiln_trace_queue
        self.writer = (
            TraceWriter(self.uri, sample, capacity, registry, priority=settings.kiln_trace_nice) if on else None
        )

    def _trace_id(self) -> str | None:
        return new_trace_id() if self.writer is not None and self.writer.sampled() else None

    def answered(self, call, body: dict) -> dict[str, str]:
        """A JSON answer: its trace handed off; the headers to add. An OpenAI answer's `id` becomes the trace id."""
        trace_id = self._trace_id()
        if trace_id is None:
            return {}
        if body.get("object") in ("chat.completion", "text_completion"):
            body["id"] = trace_id
        self.writer.submit(self._record(trace_id, call, answer=body))
        return {TRACE_HEADER: trace_id}

    def failed(self, call, fallback: str | None = None) -> dict[str, str]:
        """A failed or refused request (429 when the gateway is full); with `fallback`, the text answered
        instead of the error (LLM_FALLBACK_RESPONSE), kept as the trace's answer beside the error."""
        trace_id = self._trace_id()
        if trace_id is None:
            return {}
        answer = {} if fallback is None else {"generated_text": fallback}
        self.writer.submit(self._record(trace_id, call, answer=answer))
        return {TRACE_HEADER: trace_id}

    def streamed(self, call, chunks):
        """(headers, the stream): the relayed bytes are kept (up to STREAM_KEEP) and handed off when it ends."""
        trace_id = self._trace_id()
        if trace_id is None:
            return {}, chunks
        return {TRACE_HEADER: trace_id}, self._keep(trace_id, call, chunks)

    async def _keep(self, trace_id: str, call, chunks):
        """The stream as relayed, an OpenAI chunk's `id` replaced by the trace id (one bytes.replace
        per chunk: the events stay whole, and every chunk of one answer carries the same id)."""
        kept, upstream_id, ours = bytearray(), None, f'"id":"{trace_id}"'.encode()
        try:
            async for chunk in chunks:
                if upstream_id is None and call.route.startswith("/v1/"):
                    found = _CHUNK_ID.search(chunk)
                    upstream_id = found.group(0) if found else b""
                if upstream_id:
                    chunk = chunk.replace(upstream_id, ours)
                if len(kept) < STREAM_KEEP:
                    kept += chunk
                yield chunk
        finally:  # also when the client went away: the trace says so (status 499)
            self.writer.submit(self._record(trace_id, call, stream=bytes(kept)))

    def _served(self, version: str | None) -> tuple[str | None, str | None, str | None]:
        """(model name, alias, role) of the pool that served `version`."""
        pools = [*self.deployment.serving(), *getattr(self.deployment, "_draining", ())]
        for pool in pools:
            if pool.version == version:
                alias = pool.source.alias or (self.deployment.target.which if pool.role == "production" else None)
                return pool.source.name, alias, pool.role
        active = self.deployment.active
        return (active.source.name if active else None), None, None

    def _record(self, trace_id: str, call, answer: dict | None = None, stream: bytes = b"") -> TraceRecord:
        now = time.monotonic()
        total_s = now - call.started
        model, alias, role = self._served(call.version)
        return TraceRecord(
            trace_id=trace_id, route=call.route, request_id=call.request_id, key_id=call.key_id, status=call.status,
            started_ns=time.time_ns() - int(total_s * 1e9), total_ms=total_s * 1000, queue_ms=call.queue_s * 1000,
            ttft_ms=None if call.ttft_s is None else call.ttft_s * 1000, prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens, preset=call.preset, sent=dict(call.sent or {}),
            model=model, version=call.version, alias=alias, role=role, error=call.error, answer=answer, stream=stream,
        )  # fmt: skip

    def wait_written(self, trace_id: str, timeout: float = 10.0) -> bool:
        """False while `trace_id` is still queued to be written after `timeout`."""
        return self.writer is None or self.writer.wait_written(trace_id, timeout)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
