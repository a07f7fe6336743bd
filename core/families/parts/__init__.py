"""The machinery several model families share, owned by none (docs/architecture.md, "The family
contract"): safetensors reading and streaming writes (files.py), the tensor-by-tensor loader
(streaming.py), fp8 storage (fp8.py), the flow-matching line (flow.py), quiet diffusers loading
(loading.py), FLUX.1's autoencoder layout (autoencoder.py), the Qwen3 text encoder (qwen3.py),
kohya's names under `diffusion_model.` (kohya.py) and the tiny models' helpers (tiny.py). A family
folder imports these and never another family's folder (tests/test_family_contract.py)."""
