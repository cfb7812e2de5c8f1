"""Generation stage 2 (GPU): ONNX Runtime with the CUDA execution provider, the second GPU route.

The same device KV cache as the TensorRT backend (device_kv.py): IO binding points every past input
and present output at those device buffers, so the cache never leaves the GPU and a step's presents
become the next step's pasts by swapping two buffers. ONNX Runtime runs on our CUDA stream, so its
kernels and our copies are ordered without host synchronisation. Needs onnxruntime-gpu (with cuDNN 9)
and cuda-python.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmpack.runtime import manifest as names
from llmpack.runtime.backends.cuda_device import GPU_EXTRA, CudaDevice
from llmpack.runtime.backends.device_kv import Binding, DeviceKvBackend, Step, fit_slots
from llmpack.runtime.backends.ort_install import import_onnxruntime, preload_cuda_libraries
from llmpack.runtime.errors import ArtifactError
from llmpack.runtime.manifest import BuildManifest

CUDA_PROVIDER = "CUDAExecutionProvider"
RESERVE_BYTES = 1 << 30  # ONNX Runtime's arena grows with the activations of the longest prefill


def create_cuda_session(model_path: Path, stream_handle: int, ort=None):
    ort = ort or import_onnxruntime()
    if CUDA_PROVIDER not in ort.get_available_providers():
        raise ArtifactError(f"this onnxruntime has no {CUDA_PROVIDER}: pip uninstall onnxruntime, then {GPU_EXTRA}")
    preload_cuda_libraries(ort)  # cuDNN and CUDA from the gpu extra's wheels, before the provider looks for them
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.enable_mem_pattern = False  # shapes change every step (see ort_backend.create_session)
    provider = {"device_id": "0", "has_user_compute_stream": "1", "user_compute_stream": str(stream_handle)}
    try:
        session = ort.InferenceSession(str(model_path), options, providers=[(CUDA_PROVIDER, provider)])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped failures for bad models
        raise ArtifactError(f"ONNX Runtime cannot load {model_path} on CUDA ({exc}); rebuild the artifact") from exc
    if CUDA_PROVIDER not in session.get_providers():
        raise ArtifactError(f"ONNX Runtime did not enable CUDA for {model_path} (check the CUDA and cuDNN libraries)")
    return session


class OrtCudaBackend(DeviceKvBackend):
    """The Backend protocol on ONNX Runtime's CUDA provider; see device_kv.DeviceKvBackend for the cache."""

    name = "onnxruntime-cuda"

    def __init__(self, artifact: Path, manifest: BuildManifest, max_batch: int = 1):
        device = CudaDevice()
        self.session = create_cuda_session(Path(artifact) / names.MODEL_FILE, device.stream_handle)
        super().__init__(manifest, device, fit_slots(manifest, device.free_memory(), max_batch, RESERVE_BYTES))

    def _execute(self, step: Step, bindings: list[Binding]) -> None:
        binding = self.session.io_binding()
        for b in bindings:
            bind = binding.bind_input if b.is_input else binding.bind_output
            bind(b.name, "cuda", 0, np.dtype(b.dtype).type, list(b.shape), b.address)
        self.session.run_with_iobinding(binding)

    def _release(self) -> None:
        self.session = None  # its arena and kernels use our stream: gone before the stream is destroyed
