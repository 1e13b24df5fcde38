"""One exported model on ONNX Runtime: the session, its tokenizer, its shapes and its KV cache.

The device choice (CUDA only where a GPU and ORT's CUDA provider are both present) lives
here too, since it decides how the session binds its inputs and keeps its cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from lmforge_server.inference.errors import ModelNotReady
from lmforge_server.specs import EOS_TOKEN

CPU_EP, CUDA_EP = "CPUExecutionProvider", "CUDAExecutionProvider"

log = logging.getLogger("lmforge.inference")


def gpu_present() -> bool:
    """An NVIDIA GPU is visible to this process (without importing torch or CUDA)."""
    if os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl"):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def choose_providers(inference_device: str) -> list[str]:
    """ONNX Runtime providers for `inference_device` ("auto", "cpu", "cuda").

    CUDA only where a GPU is actually present and ORT has the CUDA provider: asking
    onnxruntime-gpu for CUDA on a machine without one logs a loud error first.
    """
    import onnxruntime as ort

    if inference_device == "cpu":
        return [CPU_EP]
    usable = CUDA_EP in ort.get_available_providers() and gpu_present()
    if inference_device.startswith("cuda") and not usable:
        raise RuntimeError(
            "inference_device is cuda but no GPU (or no ONNX Runtime CUDA provider) is present"
        )
    if inference_device not in ("auto",) and not inference_device.startswith("cuda"):
        raise ValueError(f"inference_device must be auto, cpu or cuda, got {inference_device!r}")
    if not usable:
        return [CPU_EP]
    # The CUDA provider needs CUDA and cuDNN in the process: torch's CUDA wheels bring them and
    # load them on import (as in the worker); else ORT looks in nvidia-* wheels and system paths.
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401
    ort.preload_dlls()
    return [CUDA_EP, CPU_EP]


# --- one ONNX session -------------------------------------------------------------------------


def read_variants(path: Path) -> list[dict]:
    """The graph variants exported for the model in `path` (variants.json, written by the
    export), fp32 first; a model exported before variants existed has fp32 (and fp16)."""
    try:
        variants = json.loads((path / "variants.json").read_text())["variants"]
    except (OSError, ValueError, KeyError):
        variants = [{"variant": "fp32", "file": "model.onnx", "passes_quality_gate": True}]
        if (path / "model_fp16.onnx").is_file():
            variants.append({"variant": "fp16", "file": "model_fp16.onnx"})
    return [v for v in variants if (path / v["file"]).is_file()]


def read_prefill(path: Path) -> dict | None:
    """The w8a8 prefill graph exported for the model in `path` (variants.json "prefill":
    its file, figures and the variants it prefills for), None when there is none."""
    try:
        prefill = json.loads((path / "variants.json").read_text()).get("prefill")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(prefill, dict) or not (path / str(prefill.get("file"))).is_file():
        return None
    return prefill


def choose_variant(variants: list[dict], name: str = "", *, cuda: bool) -> dict:
    """The variant named, else the one served by default.

    CPU: the fastest at export (decode ms/token measured there) among those that passed the
    quality gate (validation loss within 1% of fp32's), fp32 when none has figures. CUDA:
    fp16 where exported (the quantised graphs are CPU kernels), else fp32.
    """
    by_name = {v["variant"]: v for v in variants}
    if name:
        return by_name[name]
    if cuda:
        return by_name.get("fp16", by_name["fp32"])
    passing = [
        v
        for v in variants
        if v.get("passes_quality_gate") and v.get("decode_ms_per_token") and v["variant"] != "fp16"
    ]
    if not passing:
        return by_name["fp32"]
    return min(passing, key=lambda v: v["decode_ms_per_token"])


class KVCache:
    """The KV cache: per layer, key and value buffers [slots, n_kv, context, head_dim],
    allocated once. Slot s holds one sequence's keys and values at positions [0, length);
    ONNX Runtime writes new rows into it in place (GroupQueryAttention with the same buffer
    bound as past and present), so nothing is ever copied to grow, join or leave a batch.

    On the CPU the buffers are numpy arrays from np.zeros, whose pages the OS commits only
    when written: an unused slot, or the unused end of one, costs no memory. On CUDA they
    are torch tensors on the device (torch brings CUDA into the process there, see
    `choose_providers`).
    """

    def __init__(
        self, n_buffers: int, slots: int, n_kv: int, context: int, head_dim: int, dtype, device: str
    ):
        self.device = device
        self.slots, self.context = slots, context
        self.dtype = np.dtype(dtype)
        shape = (slots, n_kv, context, head_dim)
        if device == "cuda":
            import torch

            tdtype = torch.float16 if self.dtype == np.float16 else torch.float32
            self.buffers = [
                torch.zeros(shape, dtype=tdtype, device="cuda") for _ in range(n_buffers)
            ]
            self._ptrs = [b.data_ptr() for b in self.buffers]
        else:
            self.buffers = [np.zeros(shape, self.dtype) for _ in range(n_buffers)]
            self._ptrs = [b.ctypes.data for b in self.buffers]
        self.slot_bytes = n_kv * context * head_dim * self.dtype.itemsize
        self.slot_shape = (n_kv, context, head_dim)

    def ptr(self, buffer: int, slot: int) -> int:
        return self._ptrs[buffer] + slot * self.slot_bytes

    def copy(self, src: int, dst: int, length: int) -> None:
        """Slot `dst` gets slot `src`'s first `length` positions (n samples of one prompt)."""
        for b in self.buffers:
            b[dst, :, :length] = b[src, :, :length]

    def read(self, slot: int, length: int) -> list[np.ndarray]:
        """Host copies [1, n_kv, length, head_dim] of the slot's first `length` positions."""
        if self.device == "cuda":
            return [b[slot : slot + 1, :, :length].cpu().numpy() for b in self.buffers]
        return [b[slot : slot + 1, :, :length].copy() for b in self.buffers]

    def write(self, slot: int, arrays: list[np.ndarray]) -> None:
        """The slot's first positions get `arrays` ([1, n_kv, k, head_dim] each)."""
        for b, a in zip(self.buffers, arrays, strict=True):
            k = a.shape[2]
            if self.device == "cuda":
                import torch

                b[slot, :, :k] = torch.from_numpy(np.ascontiguousarray(a[0])).to(b.device)
            else:
                b[slot, :, :k] = a[0]


class SlotGraph:
    """An ONNX Runtime session of the static-cache graph (worker/lmforge_worker/graph.py) and
    how to run it on a `KVCache`: what the server serves and what the export times.

    A decode step (one token per row, from slot 0, on the CPU) reuses an IO binding made
    once per batch size, whose inputs and logits are arrays it owns and rewrites in place.
    Rebuilding the binding and reading the outputs back every step cost ~0.3 ms of CPU per
    step (int4 10.7M model: 1.08 ms a step against 0.76 ms for the run alone, measured
    here with one thread), a quarter of a batch-1 step.
    """

    def __init__(self, session, device: str = "cpu"):
        self.session = session
        self.device = device
        inputs = {i.name: i for i in session.get_inputs()}
        if "seqlens_k" not in inputs:
            raise ModelNotReady(
                f"the graph takes {sorted(inputs)[:3]}: it was exported before the static KV "
                "cache; export it again to serve it"
            )
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in session.get_outputs()][1:]
        first = inputs[self.past_names[0]]
        self.n_kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.cache_dtype = np.float16 if "float16" in first.type else np.float32
        vocab = session.get_outputs()[0].shape[-1]
        # 0 where the graph leaves the vocabulary symbolic (then every step binds afresh).
        self.vocab = vocab if isinstance(vocab, int) else 0
        # Decode steps bound once per (cache, batch size), on arrays owned per cache:
        # (cache, input_ids, seqlens_k, total_sequence_length, logits).
        self._steps: dict[tuple[int, int], object] = {}
        self._arrays: dict[int, tuple] = {}

    def new_cache(self, slots: int, context: int) -> KVCache:
        return KVCache(
            len(self.past_names),
            slots,
            self.n_kv_heads,
            context,
            self.head_dim,
            self.cache_dtype,
            self.device,
        )

    def _bind_cache(self, io, cache: KVCache, B: int, first_slot: int) -> None:
        shape = (B, *cache.slot_shape)
        for i, (past, present) in enumerate(zip(self.past_names, self.present_names, strict=True)):
            ptr = cache.ptr(i, first_slot)
            io.bind_input(past, self.device, 0, cache.dtype, shape, ptr)
            io.bind_output(present, self.device, 0, cache.dtype, shape, ptr)

    def run(
        self, cache: KVCache, input_ids: np.ndarray, seqlens_k, first_slot: int = 0
    ) -> np.ndarray:
        """Runs rows `input_ids` [B, S] on `cache`'s slots first_slot .. first_slot + B - 1 and
        gives each row's last-token logits [B, V] (float32).

        Row b's new tokens go to positions seqlens_k[b] + 1 - S .. seqlens_k[b] of its slot
        (a first prompt, in an empty slot, may be right-padded: it holds seqlens_k[b] + 1
        real tokens). The slots' buffers are bound as past and present alike: ONNX Runtime
        writes the new rows in place and reads the rest where it lies.

        A decode step's logits are a view that the next decode step on the same cache
        overwrites: use them (or copy them) before running again.
        """
        B, S = input_ids.shape
        if first_slot < 0 or first_slot + B > cache.slots:
            # Bound past the buffers, ORT would write outside them.
            raise ValueError(f"rows {first_slot}..{first_slot + B - 1} outside {cache.slots} slots")
        if S == 1 and first_slot == 0 and self.device == "cpu" and self.vocab:
            return self._decode(cache, input_ids, seqlens_k)
        # Bound inputs are read in place at run time: each array must outlive the run (held
        # by these locals; a temporary freed after binding gave garbage tokens).
        ids = np.ascontiguousarray(input_ids, np.int64)
        seqlens_k = np.ascontiguousarray(seqlens_k, np.int32)
        total = np.array(int(seqlens_k.max()) + 1, np.int32)
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("seqlens_k", seqlens_k)
        io.bind_cpu_input("total_sequence_length", total)
        io.bind_output("logits", "cpu")
        self._bind_cache(io, cache, B, first_slot)
        self.session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()[:, -1, :].astype(np.float32, copy=False)

    def _decode(self, cache: KVCache, input_ids: np.ndarray, seqlens_k) -> np.ndarray:
        B = input_ids.shape[0]
        arrays = self._arrays.get(id(cache))
        if arrays is None:
            # One set per cache, sized for all its slots; a binding of B rows binds the first
            # B of each, so memory stays slots x vocab whatever batch sizes run. The cache
            # is held too: its buffers stay alive while bound (and its id unique).
            arrays = self._arrays[id(cache)] = (
                cache,
                np.zeros((cache.slots, 1), np.int64),
                np.zeros(cache.slots, np.int32),
                np.zeros((), np.int32),
                np.zeros((cache.slots, 1, int(self.vocab)), np.float32),
            )
        _, ids, seqlens, total, logits = arrays
        io = self._steps.get((id(cache), B))
        if io is None:
            io = self.session.io_binding()
            io.bind_input("input_ids", "cpu", 0, np.int64, (B, 1), ids.ctypes.data)
            io.bind_input("seqlens_k", "cpu", 0, np.int32, (B,), seqlens.ctypes.data)
            io.bind_input("total_sequence_length", "cpu", 0, np.int32, (), total.ctypes.data)
            shape = (B, 1, logits.shape[2])
            io.bind_output("logits", "cpu", 0, np.float32, shape, logits.ctypes.data)
            self._bind_cache(io, cache, B, 0)
            self._steps[(id(cache), B)] = io
        ids[:B] = input_ids
        seqlens[:B] = seqlens_k
        total[...] = int(seqlens[:B].max()) + 1
        self.session.run_with_iobinding(io)
        return logits[:B, 0, :]


class OrtModel:
    """An exported model: its ORT session, tokenizer and shapes.

    `new_cache` makes a KV cache for it (`KVCache`, slots of the full context, on the
    session's device); `run` runs rows on a range of those slots and gives their logits,
    `prefill` does the same for prompt tokens.

    Prompt tokens of a quantised variant on the CPU run through the model's w8a8 prefill
    graph (`read_prefill`) where it passed the quality gate and `prefill_graph` allows:
    MatMulNBits is slow at many rows, MatMulInteger on per-row int8 activations twice as
    fast there, half as fast at one row. Both graphs read and write the same KV cache; the
    prefill session is loaded once per model, beside the decode one (`prefill_bytes`).
    """

    def __init__(
        self,
        path: Path,
        *,
        providers: list[str],
        spin: bool = False,
        variant: str = "",
        threads: int = 0,
        prefill_graph: bool = True,
    ):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.path = path
        cuda = providers[0] == CUDA_EP
        self.variants = read_variants(path)
        chosen = choose_variant(self.variants, variant, cuda=cuda)
        onnx_file = path / chosen["file"]
        self.variant = chosen["variant"]
        self.dtype = "fp16" if self.variant == "fp16" else "fp32"
        so = ort.SessionOptions()
        # ENABLE_ALL: 2.6-3x faster than no optimisation on a 124M model (KNOWN.md).
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads > 0:
            so.intra_op_num_threads = threads
        if not cuda:
            # Spin-waiting only while a run lasts: the pool's threads park the moment it
            # returns, so the scheduler, the event loop and gRPC get the cores between steps.
            # Measured in-process (int4 baby, 2 cores): a 64-token prefill 5.56 ms against
            # 6.83 not spinning, a batch-1 step 0.63 against 0.90, 16 rows 3.61 against 4.42;
            # ORT's own spinning (no stop) was as fast but spun ~48 ms of a core after each run.
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
            so.add_session_config_entry("session.force_spinning_stop", "1")
        self.session = ort.InferenceSession(str(onnx_file), so, providers=providers)
        self.provider = self.session.get_providers()[0]
        if cuda and self.provider != CUDA_EP:
            log.warning("%s: the CUDA provider did not load; serving on %s", path, self.provider)
            if self.dtype == "fp16":  # the CPU provider lacks fp16 kernels: the fp32 graph
                chosen = choose_variant(self.variants, "fp32", cuda=False)
                onnx_file, self.variant, self.dtype = path / chosen["file"], "fp32", "fp32"
                self.session = ort.InferenceSession(str(onnx_file), so, providers=[CPU_EP])
        self.device = "cuda" if self.provider == CUDA_EP else "cpu"

        config = json.loads((path / "config.json").read_text())
        self.context_length = int(config.get("max_position_embeddings", 2048))
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        eos = self.tokenizer.token_to_id(EOS_TOKEN)
        self.eos_token_id = int(config.get("eos_token_id", eos) if eos is None else eos)

        try:
            self.graph = SlotGraph(self.session, self.device)
        except ModelNotReady as e:
            raise ModelNotReady(f"model {path.name!r}: {e}") from None
        self.vocab_size = int(self.graph.vocab or config["vocab_size"])

        # The graph prompts run through: the variant's own, or the gated w8a8 prefill graph.
        self.prefill_graph, self.prefill_info, self.prefill_bytes = self.graph, None, 0
        pre = read_prefill(path) if prefill_graph and self.device == "cpu" else None
        if pre and pre.get("passes_quality_gate") and self.variant in pre.get("prefill_for", ()):
            file = path / pre["file"]
            self.prefill_graph = SlotGraph(
                ort.InferenceSession(str(file), so, providers=[CPU_EP]), self.device
            )
            self.prefill_info, self.prefill_bytes = pre, file.stat().st_size
            log.info(
                "%s: %s prompts through the prefill graph %s (%.1f MB)",
                path.name,
                self.variant,
                pre["file"],
                self.prefill_bytes / 1e6,
            )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def new_cache(self, slots: int) -> KVCache:
        """A KV cache for this model with `slots` sequence slots of the full context."""
        return self.graph.new_cache(slots, self.context_length)

    def run(
        self, cache: KVCache, input_ids: np.ndarray, seqlens_k, first_slot: int = 0
    ) -> np.ndarray:
        """`SlotGraph.run` on this model's session."""
        return self.graph.run(cache, input_ids, seqlens_k, first_slot)

    def prefill(
        self, cache: KVCache, input_ids: np.ndarray, seqlens_k, first_slot: int = 0
    ) -> np.ndarray:
        """`run` for prompt tokens (whole prompts, chunks, the rest after a reused prefix, a
        context shift's window): through the prefill graph where one serves. Every prompt
        token goes through here and every generated one through `run`, so a position's cache
        comes from the same graph however the prompt was split."""
        return self.prefill_graph.run(cache, input_ids, seqlens_k, first_slot)
