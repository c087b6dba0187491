"""Figures the paper reports (Tables 1, 2 and 4, Sec. 3.3), to print beside ours."""
from typing import Dict, Optional, TypedDict


class PaperFigures(TypedDict):
    params_m: float
    gflops: Optional[float]
    top1: float


# ImageNet-1k at 224; CabViT-P-L0's FLOPs are not given, cabvit_h_l3 is only in the reference code
PAPER: Dict[str, Optional[PaperFigures]] = {
    'cabvit_p_l0': PaperFigures(params_m=5.9, gflops=None, top1=74.3),
    'cabvit_h_l1': PaperFigures(params_m=6.2, gflops=1.5, top1=80.3),
    'cabvit_h_l2': PaperFigures(params_m=16.3, gflops=3.9, top1=83.0),
    'cabvit_h_l3': None,
}

# Table 4 (ImageNet micro setting, ConvViT at 10.5 M parameters): parameters (M) and GFLOPs before and after a step
PAPER_TABLE4 = {
    'cross_block': dict(params_m=(10.5, 10.5), gflops=(1.47, 1.52)),
    'digest_scale': dict(params_m=(10.5, 10.5), gflops=(1.52, 1.52)),
}
PAPER_EXTRA_COMPUTE = 0.13  # Sec. 3.3: "about 13 % extra computational cost" over the reference models
