"""The configs that ship with the package: `default` (every field, commented) and the named
experiments derived from it. `onerec train --config NAME` accepts these names as well as paths,
so an installed package trains without the repository's `experiments/` folder."""
