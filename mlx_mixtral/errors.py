"""The exceptions mlx-mixtral raises for bad input. The CLI turns them into one line and exit 2."""


class MlxMixtralError(Exception):
    """Base class: a problem with the user's input (a file, a setting, a prompt)."""


class ConfigError(MlxMixtralError, ValueError):
    """A model configuration is missing keys, has wrong values, or names an unknown model."""


class WeightsError(MlxMixtralError, ValueError):
    """Weight files are missing, unreadable, refused (pickles), or disagree with the config."""


class TokenizerError(MlxMixtralError, ValueError):
    """The model's tokenizer is missing or unreadable."""


class ChatFormatError(MlxMixtralError, ValueError):
    """A message list that cannot be formatted (unknown role, no user message ...)."""
