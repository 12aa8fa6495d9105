"""bf16 matmuls of SmolLM2 shapes on one thread, TFLOP/s: forward, input gradient, and weight gradient with the transposed operand as a view, made contiguous first, or pre-transposed. OMP_NUM_THREADS=1 python results/speed-cpu/mm.py"""
import torch, time
torch.manual_seed(0)
def t(f, n=10):
    f(); f()
    ts=[]
    for _ in range(n):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return min(ts)
bf=torch.bfloat16
for M,K,N in [(3304,576,1536),(1432,576,1536),(3304,576,576),(3304,576,192)]:
    x=torch.randn(M,K,dtype=bf); w=torch.randn(N,K,dtype=bf); dy=torch.randn(M,N,dtype=bf)
    fl=2*M*K*N
    fwd=t(lambda: torch.mm(x, w.t()))
    dx=t(lambda: torch.mm(dy, w))
    dw_t=t(lambda: torch.mm(dy.t(), x))   # [N,M]x[M,K]
    dw_c=t(lambda: torch.mm(dy.t().contiguous(), x))
    dw_alt=t(lambda: torch.mm(x.t(), dy).t())  # [K,M]x[M,N]
    xt=x.t().contiguous(); dyt=dy.t().contiguous()
    dw_cc=t(lambda: torch.mm(dyt, x))
    dw_f32=t(lambda: torch.mm(dy.t().float(), x.float()))
    print(M,K,N, " ".join(f"{k} {fl/v/1e12:.2f}" for k,v in dict(fwd=fwd,dx=dx,dw_t=dw_t,dw_cont=dw_c,dw_alt=dw_alt,dw_pre=dw_cc,f32=dw_f32).items()), "TFLOP/s")
