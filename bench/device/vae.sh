# Sourced by bench/device/main.sh: the VAE (`sd` preset) with as many epochs as ~VAE_SECONDS of
# training allow at the measured speed, then its GMM latent prior, then REPORT.md with PSNR,
# SSIM, bits/dim and Inception FID/KID on 10,000 samples. The Inception weights travel in fp16
# (.gpu/inc16: the TorchScript skeleton with zeroed weights + the weights as fp16 safetensors,
# 44 MB instead of 87 MB) and are cast back to fp32 here.
VAE_SECONDS=${VAE_SECONDS:-170}
INC=/tmp/stash/inception_fp16rt.pt
if [ -d .gpu/inc16 ] && [ ! -f "$INC" ]; then
  python3 - "$INC" <<'PY'
import gzip, shutil, sys, warnings
import torch
from safetensors.torch import load_file
warnings.simplefilter("ignore")
with gzip.open(".gpu/inc16/inception_skeleton.pt.gz") as f, open("/tmp/stash/skel.pt", "wb") as g:
    shutil.copyfileobj(f, g)
m = torch.jit.load("/tmp/stash/skel.pt", map_location="cpu")
sd = load_file(".gpu/inc16/inception_fp16.safetensors")
m.load_state_dict({k: v.float() for k, v in sd.items()})
torch.jit.save(m, sys.argv[1])
PY
fi
[ -f "$INC" ] && export MVE_INCEPTION_SHA1=$(sha1sum "$INC" | cut -c1-40) && echo "inception (fp16-carried) sha1 $MVE_INCEPTION_SHA1"
FID_N=${FID_N:-10000}
[ "$DEVICE" = cuda ] && [ -z "${VAE_EPOCHS:-}" ] && VAE_EPOCHS=$(python3 - "$VAE_SECONDS" <<'PY'
import sys, time
import torch
from mve.config import load_train_config
from mve.models import build_model
cfg = load_train_config("vae", preset="sd")
m = build_model("vae", cfg.model_config).cuda()
opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
x = torch.rand(cfg.batch_size, 3, 32, 32, device="cuda") * 2 - 1
def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = m.loss(x, m(x))["loss"]
    opt.zero_grad(); loss.backward(); opt.step()
for _ in range(5): step()
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): step()
torch.cuda.synchronize()
ips = 20 * cfg.batch_size / (time.perf_counter() - t)
epochs = int(max(30, min(200, float(sys.argv[1]) * ips * 0.85 / 45000)))
print(f"vae bench {ips:.0f} img/s -> {epochs} epochs", file=sys.stderr)
print(epochs)
PY
)
echo "VAE epochs: ${VAE_EPOCHS:=40}"
VAE_CMD="mve train vae --preset sd --local --device cuda --data DATA --set precision=bf16 --epochs $VAE_EPOCHS --out runs/pretrained/vae"
if run vae vae $(( VAE_SECONDS * 2 + 60 )) --preset sd --epochs "$VAE_EPOCHS"; then
  timeout 90 python3 -m mve_cli vae fit-prior /tmp/runs/vae --in-place --data "$DATA" --components 10 \
    --limit 20000 --device "$DEVICE" >> /tmp/runs/vae.log 2>&1; echo "fit-prior rc=$?"
  timeout 150 python3 -m mve_cli vae report /tmp/runs/vae --in-place --data "$DATA" --device "$DEVICE" \
    --fid "$FID_N" --inception "$INC" --json \
    --reproduce "$VAE_CMD && mve vae fit-prior runs/pretrained/vae --in-place --data DATA --components 10 --limit 20000 && mve vae report runs/pretrained/vae --in-place --data DATA --fid 10000" \
    >> /tmp/runs/vae.log 2>&1; echo "vae report rc=$?"
  tail -4 /tmp/runs/vae.log
  pack vae
fi
