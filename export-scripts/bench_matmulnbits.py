"""Time one MatMul of the mid-size transformer's shape (M 1056 tokens of a 512x512 image, K 1024,
N 2730) in float32, as MatMulNBits at several widths, block sizes and accuracy levels, and with
int8 activations in one term and in two (MatMulIntegerToFloat, quantize_w8a8.py: ONNX Runtime's
fast kernels and its exact uint8 x uint8 ones), and the relative error of each product
(docs/quantization.md):

    python export-scripts/bench_matmulnbits.py [THREADS]
"""

import numpy as np, onnx, onnxruntime as ort, time, sys
from onnx import helper, TensorProto, numpy_helper
from zimage_export.quantize import QuantizeOptions, quantize_model
from zimage_export.quantize_w8a8 import quantize_model_w8a8
M,K,N=1056,1024,2730
rng=np.random.default_rng(0)
W=(rng.standard_normal((K,N))*0.02).astype(np.float32)
X=rng.standard_normal((1,M,K)).astype(np.float32)
def model():
    node=helper.make_node("MatMul",["x","w"],["y"],name="mm")
    g=helper.make_graph([node],"g",[helper.make_tensor_value_info("x",TensorProto.FLOAT,[1,None,K])],[helper.make_tensor_value_info("y",TensorProto.FLOAT,None)],[numpy_helper.from_array(W,"w")])
    return helper.make_model(g,opset_imports=[helper.make_opsetid("",18)],ir_version=10)
def bench(m,label,threads,exact=False):
    so=ort.SessionOptions(); so.intra_op_num_threads=threads
    if exact: so.add_session_config_entry("session.x64quantprecision","1")
    s=ort.InferenceSession(m.SerializeToString(),so,providers=['CPUExecutionProvider'])
    y=s.run(None,{"x":X})[0]
    ts=[]
    for _ in range(7):
        t=time.perf_counter(); s.run(None,{"x":X}); ts.append(time.perf_counter()-t)
    med=sorted(ts)[3]
    print(f"{label:<22} threads {threads}: {med*1e3:7.1f} ms  {2*M*K*N/med/1e9:6.1f} GFLOP/s", flush=True)
    return y
threads=int(sys.argv[1]) if len(sys.argv)>1 else 2
ref=bench(model(),"fp32 MatMul",threads)
for w,b,acc in (("int8",32,4),("int8",32,0),("int8",128,4),("int4",32,4),("int4",32,0),("int4",128,4)):
    m=model(); quantize_model(m,QuantizeOptions(w,b,accuracy_level=acc))
    y=bench(m,f"{w} b{b} acc{acc}",threads)
    print("   rel err %.2e"%(np.linalg.norm(y-ref)/np.linalg.norm(ref)))
for activations in ("int8","int8x2"):
    m=model(); quantize_model_w8a8(m,activations=activations)
    y=bench(m,f"{activations} activations",threads)
    print("   rel err %.2e"%(np.linalg.norm(y-ref)/np.linalg.norm(ref)))
    y_exact=bench(m,"  exact u8u8 kernels",threads,exact=True)
    print("   same result as the fast kernels:", bool(np.array_equal(y,y_exact)))
