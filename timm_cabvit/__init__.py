"""CabViT vision transformers as timm models: importing this package registers them with timm."""
from .cabvit import CabViT, CabViTBlock, CabViTPlain

__version__ = '0.1.0'
__all__ = ['CabViT', 'CabViTBlock', 'CabViTPlain', '__version__']
