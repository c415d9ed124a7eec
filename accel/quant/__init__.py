"""accel.quant: the pieces of QuEST (diffusion) quantization, usable on their own.

- ``quantizers``: uniform quantizers (per channel / tensor / token, sym / asym) and LSQ fake-quant;
- ``packing``: 4-bit weights two per byte;
- ``kernels``: integer execution (``torch._int_mm``, oneDNN) and per-shape kernel choice;
- ``qlinear``: ``LSQLinear`` (trainable fake-quant) and ``QuantLinear`` (integer weights);
- ``calibration``: activation ranges over whole denoising trajectories, bounded memory;
- ``finetune``: temporal / sensitive layer selection and distillation;
- ``artifact``: ``QuantizedModel`` saved as safetensors + JSON;
- ``options``: the str enums of ``QuESTConfig``; ``workflow``: calibrate -> finetune -> freeze.

Pure PyTorch: importing it never imports triton or torchao.
"""
