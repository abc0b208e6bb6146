"""Checks the embedded step graphs (sdk/src/model/step/*.onnx, made by
`python -m zimage_export.step_graph`) against a numpy transcription of the SDK's host loop
(sdk/src/pipeline/denoise.rs and start.rs's inpaint blend), bit for bit on ONNX Runtime's CPU:
guided and unguided layouts, renormalisation off / on / not triggered, inpainting, the
next-call inputs and the non-finite flag. Run from the repository root:

    python export-scripts/check_step_graph.py
"""
import numpy as np
import onnxruntime as ort

rng = np.random.default_rng(1)
def ref(pred, lat, s, norm, dt, inp=None):
    B = lat.shape[0]; pos = pred[:B]; neg = pred[pred.shape[0]-B:]
    g = (pos + np.float32(s) * (pos - neg)).astype(np.float32)
    if norm > 0:
        for b in range(B):
            pn = np.float32(np.sqrt(np.sum(pos[b].astype(np.float64)**2)))
            nn = np.float32(np.sqrt(np.sum(g[b].astype(np.float64)**2)))
            mx = np.float32(pn * np.float32(norm))
            if nn > mx: g[b] = g[b] * np.float32(mx / nn)
    x = (lat + np.float32(dt) * (-g)).astype(np.float32)
    if inp is not None:
        img, noise, mask, sig, isimg = inp
        k = img if isimg else (np.float32(sig)*noise + (np.float32(1)-np.float32(sig))*img)
        x = (np.float32(1)-mask)*k + mask*x
    return x
for inpaint in (False, True):
    sess = ort.InferenceSession(f"sdk/src/model/step/step{'_inpaint' if inpaint else ''}.onnx", providers=["CPUExecutionProvider"])
    for K in (1, 2):
      for norm in (0.0, 0.3, 5.0):
        B=2; T=5; i=2
        lat = rng.standard_normal((B,16,6,8), dtype=np.float32)
        pred = rng.standard_normal((K*B,16,6,8), dtype=np.float32)
        tabs = {n: rng.standard_normal(T).astype(np.float32) for n in ("dt","scale","model_timestep")}
        tabs["normalization"] = np.full(T, norm, np.float32)
        feeds = dict(noise_pred=pred, latents=lat, step=np.array([i]), bad_step=np.array([0]), next_rows=np.array([0,1,0,1]), **tabs)
        inp = None
        if inpaint:
            img = rng.standard_normal(lat.shape, dtype=np.float32); noise = rng.standard_normal(lat.shape, dtype=np.float32)
            mask = (rng.random((6,8)) > 0.5).astype(np.float32); sig = np.float32(0.4)
            feeds.update(image_latents=img, noise=noise, mask=mask, sigma_next=np.full(T, sig, np.float32), known_is_image=np.array([False]*T))
            inp = (img, noise, mask, sig, False)
        out = sess.run(None, feeds)
        exp = ref(pred, lat, tabs["scale"][i], norm, tabs["dt"][i], inp)
        assert np.array_equal(out[0], exp), (inpaint, K, norm, np.abs(out[0]-exp).max())
        assert np.array_equal(out[1], np.concatenate([out[0], out[0]]))
        assert np.array_equal(out[2], np.full(4, tabs["model_timestep"][i+1])), out[2]
        assert out[3].tolist() == [i+1] and out[4].tolist() == [0]
        lat[0,0,0,0] = np.inf if not inpaint else lat[0,0,0,0]
        feeds["latents"] = lat
        out = sess.run(None, feeds)
        if not inpaint: assert out[4].tolist() == [i+1], out[4]
print("ok")
