"""Hostile input: well-formed protobuf requests that reach every validation branch of every RPC,
then random field-level mutations of valid requests.

Every answer must be a client-error status whose message names the field (or a success, for a
mutation that happens to stay valid); INTERNAL, UNKNOWN or UNAVAILABLE fails the test. The last
test checks the server is intact: healthy, same weight version, same greedy output. Requests go
over a raw channel (the client's own checks would stop many of them first) to the session's
real server (conftest `rollout_server`).
"""

from __future__ import annotations

import collections
import math
import os
import random
import threading
import uuid

import grpc
import numpy as np
import pytest
from rollout_fixtures import MAX_LEN, TOKEN
from safetensors.numpy import load_file

from rollout_server.protos import rollout_pb2 as pb

SVC = "/longrl.rollout.v1.Rollout/"
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ABORTED}
PROMPT = [9, 20, 31, 42, 53, 64, 75, 86]
VOCAB, HIDDEN = 384, 64
REPLIES = {"Health": pb.HealthReply, "Info": pb.InfoReply, "HasEmbeddings": pb.HasEmbeddingsReply,
           "Generate": pb.GenerateReply, "PutEmbeddings": pb.PutEmbeddingsReply,
           "UpdateWeights": pb.UpdateWeightsReply, "Shutdown": pb.ShutdownReply}
TALLY: collections.Counter = collections.Counter()   # (rpc, status) over the module


class Raw:
    """A raw channel to the server: requests exactly as built, answers as (status, details)."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", 256 << 20),
            ("grpc.max_receive_message_length", 256 << 20)])
        self.md = (("authorization", f"Bearer {TOKEN}"),)

    def call(self, rpc: str, request, timeout: float = 60.0):
        reply = REPLIES[rpc]
        if rpc in ("PutEmbeddings", "UpdateWeights"):
            fn = self.channel.stream_unary(SVC + rpc, request_serializer=_ser,
                                           response_deserializer=reply.FromString)
            request = iter(request)
        else:
            fn = self.channel.unary_unary(SVC + rpc, request_serializer=_ser,
                                          response_deserializer=reply.FromString)
        try:
            out = (grpc.StatusCode.OK, fn(request, timeout=timeout, metadata=self.md))
        except grpc.RpcError as e:
            out = (e.code(), e.details() or "")
        TALLY[rpc, out[0].name] += 1
        assert out[0] not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                              grpc.StatusCode.UNAVAILABLE), (rpc, out)
        return out


def _ser(message) -> bytes:
    return message.SerializeToString()


def refused(result, field: str, code=None) -> None:
    status, details = result
    assert status in CLIENT_ERRORS, (status, details)
    assert code is None or status == code, (status, details)
    assert field.lower() in details.lower(), (field, details)


# ---- the module's state ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fz(rollout_server):
    server, path = rollout_server
    client = server.client
    weights = load_file(os.path.join(path, "model.safetensors"))
    raw = Raw(server.address)
    rows = np.random.default_rng(0).normal(size=(8, HIDDEN)).astype(np.float32)
    client.put_embeddings("fz-rows", rows)
    state = dict(server=server, client=client, weights=weights, raw=raw, rows=rows,
                 version=client.info().weight_version, greedy=_greedy(client),
                 rejected=client.info().stats.rejected_updates)
    yield state
    raw.channel.close()


def _greedy(client):
    return client.generate([PROMPT], max_tokens=10, temperature=0.0,
                           ignore_eos=True)[0][0].token_ids


def _gen(prompts=None, **sampling) -> pb.GenerateRequest:
    s = dict(n=1, max_tokens=2, temperature=1.0, seed=1)
    s.update(sampling)
    mwv = s.pop("min_weight_version", 0)
    if prompts is None:
        prompts = [_tokens(PROMPT)]
    return pb.GenerateRequest(prompts=prompts, sampling=pb.SamplingOptions(**s),
                              min_weight_version=mwv)


def _tokens(ids) -> pb.Prompt:
    return pb.Prompt(segments=[pb.Segment(tokens=pb.TokenIds(ids=ids))])


def _ref(key="fz-rows", start=0, end=0) -> pb.Prompt:
    return pb.Prompt(segments=[pb.Segment(tokens=pb.TokenIds(ids=[5])),
                               pb.Segment(embedding=pb.EmbeddingRef(key=key, start_row=start,
                                                                    end_row=end))])


# ---- Generate ----------------------------------------------------------------------------------

def test_generate_every_bound(fz):
    call = lambda req: fz["raw"].call("Generate", req)   # noqa: E731
    IA, RE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
    refused(call(_gen(prompts=[])), "prompts", IA)
    refused(call(_gen(prompts=[_tokens([1])] * 4097)), "prompts", RE)
    for n, code in ((-1, IA), (-2 ** 31, IA), (257, RE), (2 ** 31 - 1, RE)):
        refused(call(_gen(n=n)), "sampling.n", code)
    refused(call(_gen(prompts=[_tokens([1])] * 257, n=256)), "sampling.n", RE)  # > 65,536 seqs
    for m in (0, -1, -2 ** 31, MAX_LEN, 2 ** 31 - 1):
        refused(call(_gen(max_tokens=m)), "max_tokens", IA)
    for t in (-1e-3, -math.inf, 2.001, 100.5, math.inf, math.nan, 3e38):
        refused(call(_gen(temperature=t)), "temperature", IA)
    for p in (-0.1, 1.01, math.inf, -math.inf, math.nan):
        refused(call(_gen(top_p=p)), "top_p", IA)
    for k in (-2, -2 ** 31, VOCAB + 1, 2 ** 31 - 1):
        refused(call(_gen(top_k=k)), "top_k", IA)
    for ids in ([-1], [VOCAB], [2 ** 31 - 1], [-2 ** 31], [3, VOCAB * 2]):
        refused(call(_gen(stop_token_ids=ids)), "stop_token_ids", IA)
    refused(call(_gen(stop_token_ids=[1] * 1025)), "stop_token_ids", RE)
    refused(call(_gen(seed=-1)), "seed", IA)
    refused(call(_gen(prompts=[_tokens(PROMPT)] * 2, seed=2 ** 63 - 1)), "seed", IA)
    refused(call(_gen(n=3, temperature=0.0)), "sampling", IA)   # vLLM's own rule
    refused(call(_gen(min_weight_version=2 ** 63 - 1)), "version",
            grpc.StatusCode.FAILED_PRECONDITION)
    # the prompts
    refused(call(_gen(prompts=[pb.Prompt()])), "prompt 0", IA)
    refused(call(_gen(prompts=[_tokens(PROMPT), pb.Prompt(segments=[pb.Segment()])])),
            "prompt 1 segment 0", IA)
    refused(call(_gen(prompts=[_tokens([])])), "prompt 0", IA)
    for ids in ([-1], [VOCAB], [2 ** 31 - 1], [-2 ** 31], [5, 6, VOCAB]):
        refused(call(_gen(prompts=[_tokens(ids)])), "token ids", IA)
    for key in ("", "nope", "x" * 100_000, "\x00\n\u2603", "../fz-rows"):
        refused(call(_gen(prompts=[_ref(key)])), "key", grpc.StatusCode.NOT_FOUND)
    for start, end in ((-1, 0), (8, 0), (5, 3), (0, 9), (0, -1), (2 ** 62, 0), (-2 ** 63, 4),
                       (4, 4)):
        refused(call(_gen(prompts=[_ref(start=start, end=end)])), "rows", IA)
    refused(call(_gen(prompts=[_tokens([5] * (MAX_LEN - 10))], max_tokens=20)), "max_model_len",
            IA)
    # and a few that are valid at the bounds
    for req in (_gen(n=1, max_tokens=1, top_k=VOCAB, top_p=1e-6, seed=0),
                _gen(prompts=[_ref(start=7)], temperature=2.0, stop_token_ids=[VOCAB - 1]),
                _gen(prompts=[_tokens([VOCAB - 1, 0])], max_tokens=1, seed=2 ** 63 - 1)):
        status, reply = call(req)
        assert status == grpc.StatusCode.OK, reply


# ---- PutEmbeddings and HasEmbeddings -----------------------------------------------------------

def _chunks(key="fz-put", dtype="float32", shape=(4, HIDDEN), data=None, split=1):
    if data is None:
        data = np.ones(shape, np.float32).tobytes() if dtype == "float32" else b""
    step = max(1, -(-len(data) // split))
    out = [pb.EmbeddingChunk(key=key, dtype=dtype, shape=list(shape), data=data[:step])]
    out += [pb.EmbeddingChunk(data=data[i:i + step]) for i in range(step, len(data), step)]
    return out


def test_put_embeddings_every_bound(fz):
    call = lambda chunks: fz["raw"].call("PutEmbeddings", chunks)   # noqa: E731
    IA, RE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
    ok = np.ones((4, HIDDEN), np.float32).tobytes()
    refused(call([]), "empty stream", IA)
    for key in ("", "k" * 257, "k" * 100_000):
        refused(call(_chunks(key=key)), "key", IA)
    for dtype in ("", "int8", "float64", "uint8", "x" * 10_000, "float32\x00"):
        refused(call(_chunks(dtype=dtype, data=ok)), "dtype", IA)
    for shape in ((), (4,), (0, HIDDEN), (-1, HIDDEN), (4, HIDDEN - 1), (4, HIDDEN + 1),
                  (4, HIDDEN, 1), (4, -HIDDEN), (-2 ** 62, HIDDEN)):
        refused(call(_chunks(shape=shape, data=ok)), "shape", IA)
    for shape in ((2 ** 40, HIDDEN), (2 ** 62, HIDDEN)):   # over the store's budget
        refused(call(_chunks(shape=shape, data=b"")), "budget", RE)
    refused(call(_chunks(data=ok[:-1])), "data", IA)
    refused(call(_chunks(data=b"")), "data", IA)
    refused(call(_chunks(data=ok + b"\0")), "data", IA)
    refused(call(_chunks(data=ok + ok, split=2)), "data", IA)
    bad = _chunks(data=ok, split=2)
    bad[1].key = "another"
    refused(call(bad), "key changed", IA)
    for value in (np.nan, np.inf, -np.inf):
        rows = np.ones((4, HIDDEN), np.float32)
        rows[3, 63] = value
        refused(call(_chunks(data=rows.tobytes())), "NaN or Inf", IA)
    # over the message size limit (64 MiB): gRPC itself refuses it
    refused(call(_chunks(data=b"\0" * (65 << 20), shape=((65 << 20) // 256, HIDDEN))),
            "larger than max", RE)
    assert fz["client"].has_embeddings(["fz-put", "k", "another"]) == [False] * 3
    # HasEmbeddings takes any keys
    keys = ["", "fz-rows", "x" * 10_000, "\x00", "\u2603"] * 200
    status, reply = fz["raw"].call("HasEmbeddings", pb.HasEmbeddingsRequest(keys=keys))
    assert status == grpc.StatusCode.OK and list(reply.present) == [k == "fz-rows" for k in keys]


def test_cancelled_stream_leaves_nothing(fz):
    """The client gives up mid-stream: the server drops the half-sent entry and serves on."""
    gate = threading.Event()
    rows = np.ones((1024, HIDDEN), np.float32).tobytes()

    def chunks():
        yield pb.EmbeddingChunk(key="fz-cancelled", dtype="float32", shape=[1024, HIDDEN],
                                data=rows[:4096])
        gate.wait(30)
        yield pb.EmbeddingChunk(data=rows[4096:])

    fn = fz["raw"].channel.stream_unary(SVC + "PutEmbeddings", request_serializer=_ser,
                                        response_deserializer=pb.PutEmbeddingsReply.FromString)
    fut = fn.future(chunks(), timeout=60, metadata=fz["raw"].md)
    assert fut.cancel()
    gate.set()
    with pytest.raises(grpc.FutureCancelledError):
        fut.result()
    TALLY["PutEmbeddings", "CANCELLED"] += 1
    assert fz["client"].has_embeddings(["fz-cancelled"]) == [False]
    assert fz["client"].health().ready


# ---- UpdateWeights -----------------------------------------------------------------------------

def _table(weights, dtype="float32"):
    table, total = [], 0
    for name, a in weights.items():
        table.append(pb.TensorMeta(name=name, dtype=dtype, shape=list(a.shape), offset=total,
                                   nbytes=a.nbytes))
        total += a.nbytes
    return table, total


def _nan_bytes(total: int) -> bytes:
    return b"\xff" * total   # every float32 a NaN: whatever the table says, nothing can load


def _header(fz, **kw) -> pb.WeightChunk:
    table, total = _table(fz["weights"])
    h = dict(version=fz["version"] + 1, tensors=table, total_bytes=total)
    h.update(kw)
    return pb.WeightChunk(**h)


def _stream(header, data: bytes, chunk: int = 1 << 20):
    return [header] + [pb.WeightChunk(data=data[i:i + chunk]) for i in range(0, len(data), chunk)]


def _shm_file(data: bytes, name: str | None = None) -> str:
    path = os.path.join("/dev/shm", name or f"longrl-weights-{os.getpid()}-{uuid.uuid4().hex}")
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_update_weights_every_bound(fz):
    call = lambda chunks: fz["raw"].call("UpdateWeights", chunks)   # noqa: E731
    IA = grpc.StatusCode.INVALID_ARGUMENT
    weights = fz["weights"]
    table, total = _table(weights)
    nan = _nan_bytes(total)
    good = b"".join(np.ascontiguousarray(a).tobytes() for a in weights.values())
    v = fz["version"]
    refused(call([]), "empty stream", IA)
    for version in (v, 0, -1, -2 ** 63):
        refused(call(_stream(_header(fz, version=version), good)), "version", IA)
    for t in (0, -1, -2 ** 63):
        refused(call([_header(fz, total_bytes=t)]), "total_bytes", IA)

    def edited(fn, total_bytes=total):
        tab = [pb.TensorMeta() for _ in table]
        for a, b in zip(tab, table):
            a.CopyFrom(b)
        fn(tab)
        return _header(fz, tensors=tab, total_bytes=total_bytes)

    def setf(i, **kw):
        def fn(tab):
            for k, val in kw.items():
                if k == "shape":
                    del tab[i].shape[:]
                    tab[i].shape.extend(val)
                else:
                    setattr(tab[i], k, val)
        return fn

    first = table[0]
    refused(call([edited(lambda tab: tab.append(tab[0]))]), "appears twice", IA)
    for name in ("", "model.layers.9.mlp.up_proj.weight", "x" * 10_000, "\u2603", "\x00"):
        refused(call([edited(setf(1, name=name))]), "tensor name", IA)
    for dtype in ("float16", "bfloat16", "", "int64", "x" * 1000):
        refused(call([edited(setf(0, dtype=dtype))]), "dtype", IA)
    for shape in ([], list(first.shape) + [1], [first.shape[0], -first.shape[1]],
                  [first.shape[0] + 1, first.shape[1]], [2 ** 62, 2 ** 62]):
        refused(call([edited(setf(0, shape=shape))]), "shape", IA)
    for nb in (first.nbytes + 1, first.nbytes - 4, 0, -1, 2 ** 63 - 1):
        refused(call([edited(setf(0, nbytes=nb))]), "nbytes", IA)
    for off in (-1, -2 ** 63, total, total - 4, 2 ** 62):
        refused(call([edited(setf(0, offset=off))]), "offset", IA)
    refused(call([edited(setf(1, offset=0))]), "overlap", IA)
    refused(call([edited(lambda tab: tab.pop(3))]), "missing", IA)
    # the streamed transport: short, long, NaN
    refused(call(_stream(_header(fz), good[:-1])), "received", IA)
    refused(call(_stream(_header(fz), b"")), "received", IA)
    refused(call(_stream(_header(fz), good + b"\0")), "more than the declared", IA)
    refused(call(_stream(_header(fz), nan)), "NaN or Inf", IA)
    # the shared-memory transport: only a client's weight file, directly in /dev/shm, whole
    made = []
    try:
        small = _shm_file(good[:-4])
        large = _shm_file(good + b"\0" * 4)
        nan_file = _shm_file(nan)
        other = _shm_file(good, name=f"psm_fz{uuid.uuid4().hex[:8]}")
        folder = os.path.join("/dev/shm", f"longrl-weights-{os.getpid()}-{uuid.uuid4().hex}")
        os.mkdir(folder)
        link = os.path.join("/dev/shm", f"longrl-weights-{os.getpid()}-{uuid.uuid4().hex}")
        os.symlink("/etc/hostname", link)
        made = [small, large, nan_file, other, folder, link]
        for path in ("/etc/passwd", "/dev/shm/../etc/passwd", "longrl-weights-relative",
                     "/dev/shm", "/dev/shm/", other, small, large, folder, link,
                     "/dev/shm/longrl-weights-missing", "/dev/shm/longrl-weights-\x00x",
                     "/dev/shm/" + "longrl-weights-" + "x" * 5000):
            refused(call([_header(fz, shm_path=path)]), "shm_path", IA)
        refused(call([_header(fz, shm_path=nan_file)]), "NaN or Inf", IA)
    finally:
        for p in made:
            os.rmdir(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)


def test_concurrent_updates_are_refused(fz):
    """A second update while one streams: ABORTED, and the first still ends on its own merits."""
    call = fz["raw"].call
    table, total = _table(fz["weights"])
    started, gate = threading.Event(), threading.Event()
    first_result = {}

    def stalled():
        yield _header(fz)
        yield pb.WeightChunk(data=b"\xff" * 1024)
        started.set()
        gate.wait(60)

    t = threading.Thread(target=lambda: first_result.update(r=call("UpdateWeights", stalled())))
    t.start()
    try:
        assert started.wait(60)
        for chunks in ([_header(fz)], _stream(_header(fz), _nan_bytes(total))):
            refused(call("UpdateWeights", chunks), "in progress", grpc.StatusCode.ABORTED)
        # Generate is served meanwhile (the stream is still being received)
        assert _greedy(fz["client"]) == fz["greedy"]
    finally:
        gate.set()
        t.join()
    refused(first_result["r"], "received", grpc.StatusCode.INVALID_ARGUMENT)


def test_generates_during_an_update(fz):
    """Eight greedy Generates race a real update (the same weights, one version up): each is
    served by one version or the other, with the same output."""
    client = fz["client"]
    v = fz["version"]
    outs, errors = [], []

    def gen():
        try:
            [[s]] = client.generate([PROMPT], max_tokens=10, temperature=0.0, ignore_eos=True)
            outs.append((s.weight_version, s.token_ids))
        except Exception as e:   # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=gen) for _ in range(8)]
    for t in threads[:4]:
        t.start()
    client.update_weights(fz["weights"], v + 1, transport="stream")
    for t in threads[4:]:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert {w for w, _ in outs} <= {v, v + 1} and len(outs) == 8
    assert all(ids == fz["greedy"] for _, ids in outs)
    fz["version"] = v + 1
    TALLY["Generate", "OK"] += 8
    TALLY["UpdateWeights", "OK"] += 1


# ---- random mutations of valid requests ----------------------------------------------------------

INT32 = [-2 ** 31, -1, 0, 1, 2, 7, 8, VOCAB - 1, VOCAB, MAX_LEN - 1, MAX_LEN, 2 ** 31 - 1]
INT64 = INT32 + [-2 ** 63, 2 ** 40, 2 ** 62, 2 ** 63 - 1]
FLOATS = [-math.inf, -1.0, -0.0, 0.0, 1e-30, 0.5, 1.0, 1.0001, 2.0, 2.001, 100.5, 3e38,
          math.inf, math.nan]
STRINGS = ["", "a", "x" * 300, "x" * 5000, "\x00", "\u2603\n", "../../etc/passwd", "fz-rows",
           "float32", "bfloat16", "int8", "model.embed_tokens.weight", "/dev/shm/psm_1"]
SMALL = {"n": [-2 ** 31, -1, 0, 1, 2, 257, 2 ** 31 - 1],           # valid values stay cheap
         "max_tokens": [-2 ** 31, -1, 0, 1, 3, MAX_LEN, 2 ** 31 - 1]}


def _value(field, rng):
    from google.protobuf.descriptor import FieldDescriptor as F
    if field.name in SMALL:
        return rng.choice(SMALL[field.name])
    t = field.type
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return rng.choice(INT32)
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return rng.choice(INT64)
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return rng.choice(FLOATS)
    if t == F.TYPE_BOOL:
        return rng.random() < 0.5
    if t == F.TYPE_STRING:
        return rng.choice(STRINGS)
    if t == F.TYPE_BYTES:
        return bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 3, 64])))
    return None


def _mutate(msg, rng, depth=0) -> None:
    """One random change somewhere in `msg`: a scalar set to a boundary value, a repeated field
    cleared, grown or given a boundary element, or the change made inside a sub-message."""
    from google.protobuf.descriptor import FieldDescriptor as F
    fields = list(msg.DESCRIPTOR.fields)
    field = rng.choice(fields)
    repeated = (field.is_repeated if hasattr(field, "is_repeated")
                else field.label == F.LABEL_REPEATED)
    if field.type == F.TYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            return
        sub = getattr(msg, field.name)
        if repeated:
            if len(sub) and rng.random() < 0.15:
                del sub[rng.randrange(len(sub))]
            elif len(sub) and rng.random() < 0.15:
                sub.add().CopyFrom(sub[rng.randrange(len(sub))])
            elif len(sub) and depth < 4:
                _mutate(sub[rng.randrange(len(sub))], rng, depth + 1)
            else:
                sub.add()
        elif depth < 4:
            _mutate(sub, rng, depth + 1)
        return
    value = _value(field, rng)
    if repeated:
        items = getattr(msg, field.name)
        r = rng.random()
        if r < 0.2:
            del items[:]
        elif r < 0.6 and len(items):
            items[rng.randrange(len(items))] = value
        else:
            items.append(value)
    else:
        setattr(msg, field.name, value)


def test_random_mutations_of_valid_requests(fz):
    rng = random.Random(15)
    raw = fz["raw"]
    weights = fz["weights"]
    table, total = _table(weights)
    nan = _nan_bytes(total)
    nan_file = _shm_file(nan)
    outcomes = collections.Counter()
    try:
        for i in range(1200):
            kind = i % 6
            if kind in (0, 1):
                req = _gen(prompts=[_tokens(PROMPT), _ref(start=1, end=6)], max_tokens=2)
                for _ in range(rng.randint(1, 3)):
                    _mutate(req, rng)
                status, _ = raw.call("Generate", req)
            elif kind == 2:
                chunks = _chunks(key=f"fz-mut-{i}", split=rng.choice([1, 2, 3]))
                for _ in range(rng.randint(1, 3)):
                    _mutate(rng.choice(chunks), rng)
                if rng.random() < 0.2:
                    chunks.insert(rng.randrange(len(chunks) + 1), pb.EmbeddingChunk())
                status, _ = raw.call("PutEmbeddings", chunks)
            elif kind in (3, 4):   # the data is all NaN: whatever survives, nothing loads
                header = _header(fz, shm_path=nan_file if kind == 3 else "")
                for _ in range(rng.randint(1, 3)):
                    _mutate(header, rng)
                chunks = [header] if kind == 3 else _stream(header, nan, chunk=1 << 18)
                status, _ = raw.call("UpdateWeights", chunks)
                assert status != grpc.StatusCode.OK
            else:
                req = pb.HasEmbeddingsRequest(keys=["fz-rows", "x"])
                _mutate(req, rng)
                status, _ = raw.call("HasEmbeddings", req)
                raw.call("Health", pb.HealthRequest())
                raw.call("Info", pb.InfoRequest())
            outcomes[status.name] += 1
    finally:
        os.remove(nan_file)
    assert sum(outcomes.values()) == 1200
    assert outcomes["INVALID_ARGUMENT"] > 300, outcomes   # most mutations are caught, by name
    assert outcomes["OK"] > 50, outcomes                  # and valid ones still served


# ---- afterwards --------------------------------------------------------------------------------

def test_server_intact_after_the_fuzz(fz):
    client = fz["client"]
    assert fz["server"].alive() and client.health().ready
    info = client.info()
    assert info.weight_version == fz["version"]
    assert _greedy(client) == fz["greedy"]
    assert info.stats.rejected_updates > fz["rejected"]
    total = sum(TALLY.values())
    bad = {k: v for k, v in TALLY.items() if k[1] in ("INTERNAL", "UNKNOWN", "UNAVAILABLE")}
    print("\nfuzz requests by RPC and status:")
    for (rpc, status), count in sorted(TALLY.items()):
        print(f"  {rpc:14s} {status:20s} {count:6d}")
    print(f"  total {total}")
    assert total >= 1000 and not bad
    assert {rpc for rpc, _ in TALLY} >= set(REPLIES) - {"Shutdown"}
