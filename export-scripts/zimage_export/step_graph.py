"""The denoising loop's per-step arithmetic as a small ONNX graph, so that it runs where the
transformer runs and the latents never leave the device between steps (`sdk/src/model/step.rs`
drives it; the files are embedded in the SDK, not part of a package).

One call after each transformer call does, in float32 and in the order of the SDK's host loop
(`sdk/src/pipeline/denoise.rs`, itself checked against diffusers' ZImagePipeline):

    pos, neg   = noise_pred[:B], noise_pred[N-B:]        (neg == pos when unguided, N == B)
    pred       = pos + scale[i] * (pos - neg)
    if normalization[i] > 0 and |pred| > normalization[i] * |pos|  (per image, L2 in float64):
        pred   = pred * (normalization[i] * |pos| / |pred|)
    latents    = latents + dt[i] * -pred                  (Euler, v = -pred)
    [inpaint]  known = image if known_is_image[i] else sigma_next[i] * noise + (1 - sigma_next[i]) * image
               latents = (1 - mask) * known + mask * latents
    bad_step   = i + 1 if bad_step == 0 and latents hold a NaN/Inf, else bad_step
    step       = i + 1
    model_input = latents[next_rows]                     (the next call's batch: [x] or [x; x])
    timestep   = model_timestep[i + 1] for every row of model_input

Per-step values come from tables indexed by the step counter on the device (length steps + 1),
so nothing is copied between host and device from one step to the next. Unguided steps have
scale 0 and normalization 0: `pos + 0 * 0` is `pos` exactly.

    python -m zimage_export.step_graph OUT_DIR     # writes step.onnx and step_inpaint.onnx
"""

import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

OPSET = 18
F32, F64, I64, BOOL = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.BOOL


def build(inpaint: bool) -> onnx.ModelProto:
    nodes = []

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    inits = [
        helper.make_tensor("axis0", I64, [1], [0]),
        helper.make_tensor("axes123", I64, [3], [1, 2, 3]),
        helper.make_tensor("zero_i64", I64, [1], [0]),
        helper.make_tensor("one_i64", I64, [1], [1]),
        helper.make_tensor("zero_f32", F32, [], [0.0]),
    ]
    if inpaint:
        inits.append(helper.make_tensor("one_f32", F32, [], [1.0]))
    # Shapes: B rows of latents, N rows of the prediction (B or 2B).
    node("Shape", ["latents"], "latents_shape")
    node("Slice", ["latents_shape", "zero_i64", "one_i64", "axis0"], "rows")
    node("Shape", ["noise_pred"], "pred_shape")
    node("Slice", ["pred_shape", "zero_i64", "one_i64", "axis0"], "pred_rows")
    node("Sub", ["pred_rows", "rows"], "neg_start")
    node("Slice", ["noise_pred", "zero_i64", "rows", "axis0"], "pos")
    node("Slice", ["noise_pred", "neg_start", "pred_rows", "axis0"], "neg")
    # Guidance: pos + scale * (pos - neg).
    node("Gather", ["scale", "step"], "scale_i")
    node("Sub", ["pos", "neg"], "pos_minus_neg")
    node("Mul", ["scale_i", "pos_minus_neg"], "scaled")
    node("Add", ["pos", "scaled"], "guided")
    # Renormalisation, per image, norms in float64 as the host loop computes them.
    node("Gather", ["normalization", "step"], "norm_i")
    for name in ("pos", "guided"):
        node("Cast", [name], f"{name}_f64", to=F64)
        node("ReduceSumSquare", [f"{name}_f64", "axes123"], f"{name}_sq", keepdims=1)
        node("Sqrt", [f"{name}_sq"], f"{name}_norm64")
        node("Cast", [f"{name}_norm64"], f"{name}_norm", to=F32)
    node("Mul", ["pos_norm", "norm_i"], "max_norm")
    node("Greater", ["norm_i", "zero_f32"], "norm_on")
    node("Greater", ["guided_norm", "max_norm"], "too_long")
    node("And", ["norm_on", "too_long"], "rescale")
    node("Div", ["max_norm", "guided_norm"], "factor")
    node("Mul", ["guided", "factor"], "rescaled")
    node("Where", ["rescale", "rescaled", "guided"], "prediction")
    # Euler: x + dt * -prediction.
    node("Gather", ["dt", "step"], "dt_i")
    node("Neg", ["prediction"], "velocity")
    node("Mul", ["dt_i", "velocity"], "delta")
    last = node("Add", ["latents", "delta"], "stepped")
    if inpaint:
        node("Gather", ["sigma_next", "step"], "sigma_i")
        node("Mul", ["sigma_i", "noise"], "noise_part")
        node("Sub", ["one_f32", "sigma_i"], "one_minus_sigma")
        node("Mul", ["one_minus_sigma", "image_latents"], "image_part")
        node("Add", ["noise_part", "image_part"], "renoised")
        node("Gather", ["known_is_image", "step"], "known_flag")
        node("Where", ["known_flag", "image_latents", "renoised"], "known")
        node("Sub", ["one_f32", "mask"], "keep")
        node("Mul", ["keep", "known"], "known_part")
        node("Mul", ["mask", "stepped"], "repaint_part")
        last = node("Add", ["known_part", "repaint_part"], "blended")
    nodes.append(helper.make_node("Identity", [last], ["latents_out"], name="latents_out"))
    # Non-finite watch: x - x is 0 for finite x and NaN otherwise.
    node("Sub", [last, last], "self_diff")
    node("ReduceSum", ["self_diff"], "diff_sum", keepdims=1)
    node("IsNaN", ["diff_sum"], "bad_now_nd")
    node("Reshape", ["bad_now_nd", "one_i64"], "bad_now")
    node("Equal", ["bad_step", "zero_i64"], "none_bad_yet")
    node("And", ["bad_now", "none_bad_yet"], "first_bad")
    nodes.append(helper.make_node("Add", ["step", "one_i64"], ["step_out"], name="step_out"))
    nodes.append(helper.make_node("Where", ["first_bad", "step_out", "bad_step"], ["bad_step_out"], name="bad_step_out"))
    # The next transformer call's inputs.
    nodes.append(helper.make_node("Gather", [last, "next_rows"], ["model_input"], name="model_input", axis=0))
    node("Gather", ["model_timestep", "step_out"], "t_next")
    node("Shape", ["next_rows"], "next_count")
    nodes.append(helper.make_node("Expand", ["t_next", "next_count"], ["timestep"], name="timestep"))

    def tensor(name, elem, shape):
        return helper.make_tensor_value_info(name, elem, shape)

    image = ["B", "C", "H", "W"]
    inputs = [
        tensor("noise_pred", F32, ["N", "C", "H", "W"]),
        tensor("latents", F32, image),
        tensor("step", I64, [1]),
        tensor("bad_step", I64, [1]),
        tensor("dt", F32, ["T"]),
        tensor("scale", F32, ["T"]),
        tensor("normalization", F32, ["T"]),
        tensor("model_timestep", F32, ["T"]),
        tensor("next_rows", I64, ["M"]),
    ]
    if inpaint:
        inputs += [
            tensor("image_latents", F32, image),
            tensor("noise", F32, image),
            tensor("mask", F32, ["H", "W"]),
            tensor("sigma_next", F32, ["T"]),
            tensor("known_is_image", BOOL, ["T"]),
        ]
    outputs = [
        tensor("latents_out", F32, image),
        tensor("model_input", F32, ["M", "C", "H", "W"]),
        tensor("timestep", F32, ["M"]),
        tensor("step_out", I64, [1]),
        tensor("bad_step_out", I64, [1]),
    ]
    name = "zimage_step_inpaint" if inpaint else "zimage_step"
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="zimage_export")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for inpaint, file in ((False, "step.onnx"), (True, "step_inpaint.onnx")):
        (out / file).write_bytes(build(inpaint).SerializeToString())
        print(out / file)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sdk/src/model/step")
