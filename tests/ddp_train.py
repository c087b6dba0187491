"""Run by test_training.py under `torch.distributed.run --nproc_per_node=2`: three DDP steps on CPU (gloo).

Each rank gets other data; DDP without find_unused_parameters, with drop path and grad checkpointing.
Rank 0 prints the largest difference between the ranks' parameters after training.
"""
import json

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch.nn.parallel import DistributedDataParallel

import timm_cabvit  # noqa: F401  (registers the models)


def main() -> None:
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = timm.create_model('cabvit_h_l1', num_classes=4, img_size=64, drop_path_rate=0.1)
    model.set_grad_checkpointing(True)
    initial = torch.cat([p.detach().flatten() for p in model.parameters()])
    ddp_model = DistributedDataParallel(model)
    optimizer = create_optimizer_v2(model, 'sgd', lr=0.1, weight_decay=0.)
    torch.manual_seed(1 + rank)
    for _ in range(3):
        x, target = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2,))
        loss = F.cross_entropy(ddp_model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, weights)
    if rank == 0:
        print(json.dumps({
            'rank_max_diff': (gathered[0] - gathered[1]).abs().max().item(),
            'moved': (weights - initial).abs().max().item(),
            'loss': loss.item(),
        }))
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
