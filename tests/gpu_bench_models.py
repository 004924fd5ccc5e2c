"""Realistically sized detectors with random weights, built offline, for `sightstream bench`
on a GPU host (speed is what counts, so the weights need not be trained):

- `bench/yolo`: a YOLOv8n-sized ONNX detector (about 2 M parameters, 5 GFLOPs at 640x640, the
  [batch, 84, 8400] output of an Ultralytics export), for onnxruntime-gpu;
- `bench/yolo-torch`: the same network as a TorchScript file (backend `torch`), for torch
  CUDA: one network on both runtimes;
- `bench/rtdetr`: an RT-DETR-r18-sized transformers detector (about 20 M parameters), for
  torch CUDA through transformers.

    python -m tests.gpu_bench_models /srv/bench      # writes the models and bench.toml
    sightstream bench --config /srv/bench/bench.toml --model bench/yolo --device cuda:0
"""

from __future__ import annotations

import sys
from pathlib import Path


def yolo_sized(path: Path, torchscript: Path, size: int = 640) -> tuple[Path, Path]:
    """The ONNX file and the TorchScript file of one random-weight YOLOv8n-sized network."""
    import json
    import warnings

    import torch
    from torch import nn

    def conv(c1: int, c2: int, stride: int = 1) -> nn.Module:
        return nn.Sequential(nn.Conv2d(c1, c2, 3, stride, 1, bias=False), nn.BatchNorm2d(c2), nn.SiLU())

    class Residual(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.body = nn.Sequential(conv(c, c), conv(c, c))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.body(x)

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p3 = nn.Sequential(conv(3, 16, 2), conv(16, 32, 2), Residual(32), conv(32, 64, 2),
                                    Residual(64), Residual(64))
            self.p4 = nn.Sequential(conv(64, 128, 2), Residual(128), Residual(128))
            self.p5 = nn.Sequential(conv(128, 256, 2), Residual(256))
            self.heads = nn.ModuleList(
                nn.Sequential(conv(c, 64), conv(64, 64), nn.Conv2d(64, 84, 1)) for c in (64, 128, 256))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p3 = self.p3(x)
            p4 = self.p4(p3)
            p5 = self.p5(p4)
            outs = [head(p).flatten(2) for head, p in zip(self.heads, (p3, p4, p5))]
            return torch.cat(outs, dim=2).sigmoid() * size  # [batch, 84, 8400]

    torch.manual_seed(0)
    model = Detector().eval()
    example = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings():  # both are deprecated in torch 2.13, and still what users have
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, example, str(path), dynamo=False,
                          input_names=["images"], output_names=["output0"],
                          dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}})
        traced = torch.jit.trace(model, example)
        config = {"imgsz": [size, size], "names": {str(i): f"class{i}" for i in range(80)}}
        torch.jit.save(traced, str(torchscript), _extra_files={"config.txt": json.dumps(config)})
    return path, torchscript


def rtdetr_sized(folder: Path) -> Path:
    import torch
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig
    from transformers.models.rt_detr.image_processing_pil_rt_detr import RTDetrImageProcessorPil

    torch.manual_seed(0)
    backbone = RTDetrResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                                  out_features=["stage2", "stage3", "stage4"])
    config = RTDetrConfig(backbone_config=backbone, encoder_in_channels=[128, 256, 512], decoder_layers=3)
    RTDetrForObjectDetection(config).save_pretrained(folder)
    RTDetrImageProcessorPil(size={"height": 640, "width": 640}).save_pretrained(folder)
    return folder


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    yolo, yolo_torch = yolo_sized(out / "yolo.onnx", out / "yolo.torchscript")
    rtdetr = rtdetr_sized(out / "rtdetr")
    (out / "bench.toml").write_text(f"""[models.bench.yolo]
backend = "onnx"
task = "detect"
path = "{yolo}"
input_size = 640

[models.bench.yolo-torch]
backend = "torch"
task = "detect"
path = "{yolo_torch}"

[models.bench.rtdetr]
backend = "transformers"
task = "detect"
path = "{rtdetr}"
""")
    print(f"wrote {yolo}, {yolo_torch}, {rtdetr} and {out / 'bench.toml'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
