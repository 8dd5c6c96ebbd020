"""relp: relevance patching, attribution patching and activation patching for circuit discovery."""

from relp.models import to_tokens

__all__ = ["to_tokens"]
__version__ = "0.1.0"
