"""The merge methods mergekit-esm adds to mergekit, one module each, by recipe name."""

from mergekit_esm.methods import esm, iso_c, iso_cts, regmean, regmean_plus_plus, tsv
from mergekit_esm.methods.base import MergeSettings, MethodDefinition

METHODS: dict[str, MethodDefinition] = {
    m.METHOD.name: m.METHOD for m in (esm, tsv, iso_c, iso_cts, regmean, regmean_plus_plus)
}

__all__ = ["METHODS", "MergeSettings", "MethodDefinition"]
