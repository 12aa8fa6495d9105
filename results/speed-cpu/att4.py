"""Forward + backward of one SmolLM2 attention layer (9 heads of 64, packed rows, block-diagonal causal mask) on one thread: sdpa on fp32 q, k, v against bf16, by row length. OMP_NUM_THREADS=1 python results/speed-cpu/att4.py"""
import torch, time, torch.nn.functional as F
torch.manual_seed(0)
def t(f, n=5):
    f(); f(); ts=[]
    for _ in range(n):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return min(ts)*1e3
H,d=9,64
for R,T in [(8,128),(8,192),(8,224),(8,256),(8,288),(8,320),(8,384),(8,448),(8,512),(4,700)]:
    seg=torch.zeros(R,T,dtype=torch.long); seg[:, T//2:]=1
    mask=((seg[:,:,None]==seg[:,None,:]) & torch.ones(T,T,dtype=torch.bool).tril())[:,None]
    res=[]
    for name in ("fp32cast","bf16"):
        q,k,v=(torch.randn(R,H,T,d,dtype=torch.bfloat16,requires_grad=True) for _ in range(3))
        if name=="fp32cast":
            fn=lambda: F.scaled_dot_product_attention(q.float(),k.float(),v.float(),attn_mask=mask).bfloat16()
        else:
            fn=lambda: F.scaled_dot_product_attention(q,k,v,attn_mask=mask)
        g=torch.randn(R,H,T,d,dtype=torch.bfloat16)
        def fb():
            o=fn(); o.backward(g)
        res.append(t(fb))
    print(R,T,f"fp32 {res[0]:.1f} bf16 {res[1]:.1f} ratio {res[0]/res[1]:.2f}", flush=True)
