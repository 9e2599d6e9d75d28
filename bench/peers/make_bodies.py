"""Writes the request bodies the peers are load-tested with (``wrk -s bench/peers/post.lua``).

Into ``--out`` (default ``/tmp/peer-bodies``): ``image.jpg`` (a CIFAR-like random 32x32 RGB
image, Pillow JPEG quality 75), ``image.png`` (the same pixels), ``classify.json``
(``{"images": [base64 JPEG]}``) and ``infer.bin`` (the OIP v2 binary body that
``tritonclient.http`` sends for it) with its header length in ``infer.bin.hlen``, and
``infer_2d.bin`` (+ ``.hlen``), the same with shape ``[1, 1]`` for Triton. Prints the
``wrk`` command lines. Run::

    python bench/peers/make_bodies.py --out /tmp/peer-bodies
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path

from PIL import Image

from common import cifar_like_jpeg, oip_binary_body


def write_bodies(out: Path, seed: int = 0) -> dict[str, Path]:
    """Writes the bodies into ``out``; returns their paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    jpeg = cifar_like_jpeg(seed)
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert("RGB").save(png, format="PNG")
    body, hlen = oip_binary_body(jpeg)
    body2, hlen2 = oip_binary_body(jpeg, two_d=True)
    files = {"jpeg": (out / "image.jpg", jpeg), "png": (out / "image.png", png.getvalue()),
             "json": (out / "classify.json",
                      json.dumps({"images": [base64.b64encode(jpeg).decode()]}).encode()),
             "oip": (out / "infer.bin", body),
             "oip_hlen": (out / "infer.bin.hlen", str(hlen).encode()),
             "oip2d": (out / "infer_2d.bin", body2),
             "oip2d_hlen": (out / "infer_2d.bin.hlen", str(hlen2).encode())}
    for path, data in files.values():
        path.write_bytes(data)
    return {k: p for k, (p, _) in files.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/peer-bodies"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    f = write_bodies(args.out, args.seed)
    hlen = f["oip_hlen"].read_text()
    lua = Path(__file__).with_name("post.lua")
    print(f"BODY={f['jpeg']} CTYPE=image/jpeg wrk -t1 -c8 -d5s --latency -s {lua} "
          "http://127.0.0.1:PORT/v1/classify")
    print(f"BODY={f['oip']} CTYPE=application/octet-stream HLEN={hlen} wrk -t1 -c8 -d5s "
          f"--latency -s {lua} http://127.0.0.1:PORT/v2/models/classifier/infer")


if __name__ == "__main__":
    main()
