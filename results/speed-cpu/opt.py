"""One AdamW step over SmolLM2-135M-shaped parameters on one thread: the default multi-tensor (foreach) kernel against fused. OMP_NUM_THREADS=1 python results/speed-cpu/opt.py"""
import torch, time
shapes=[(49152,576)]+[(576,576),(192,576),(192,576),(576,576),(1536,576),(1536,576),(576,1536),(576,),(576,)]*30+[(576,),(1,576)]
for kind in ("foreach","fused","foreach","fused"):
    ps=[torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in ps: p.grad=torch.randn_like(p)
    o=torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.0, **({"fused":True} if kind=="fused" else {"foreach":True}))
    o.step(); o.step()
    ts=[]
    for _ in range(5):
        t0=time.perf_counter(); o.step(); ts.append(time.perf_counter()-t0)
    print(kind, f"{min(ts)*1e3:.0f} ms", sum(p.numel() for p in ps)/1e6, "M params")
