"""Every exception mlx-mixtral raises for bad input. The CLI turns them into one line, exit 2.

They all derive from `MlxMixtralError`; the ones about values also from `ValueError`, so code
that catches `ValueError` keeps working.
"""


class MlxMixtralError(Exception):
    """Base class: a problem with the user's input (a file, a setting, a prompt).

    `params`: the API parameters the message names, as written there (`max_memory=`,
    `force=True`); the command line puts its flags in their place.
    """

    def __init__(self, *args: object, params: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        self.params = params


class ConfigError(MlxMixtralError, ValueError):
    """A model configuration is missing keys, has wrong values, or names an unknown model."""


class WeightsError(MlxMixtralError, ValueError):
    """Weight files are missing, unreadable, refused (pickles), or disagree with the config."""


class TokenizerError(MlxMixtralError, ValueError):
    """The model's tokenizer is missing or unreadable."""


class ChatFormatError(MlxMixtralError, ValueError):
    """A message list that cannot be formatted (unknown role, no user message ...)."""


class SamplingError(MlxMixtralError, ValueError):
    """A sampling setting out of its range."""


class GenerationError(MlxMixtralError, ValueError):
    """A prompt that cannot be generated from (empty, longer than the context ...)."""


class MemoryLimitError(MlxMixtralError):
    """The model needs more memory than is available (pass force=True / --force to try)."""


class ConvertError(MlxMixtralError):
    """The output folder cannot be written as asked."""


class StoreError(MlxMixtralError):
    """The conversation database is unreadable, or from a newer version of mlx-mixtral."""


class PromptCacheError(MlxMixtralError, ValueError):
    """A saved prompt cache that is corrupt, truncated, or from another model."""


class DistributedError(MlxMixtralError):
    """Under mlx.launch: a rank was lost (it stopped, or the network failed). Not the user's
    input: the command exits with status 1."""
