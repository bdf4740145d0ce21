"""The prefix store: KV caches kept in blocks of tokens, in RAM and on disk, found again by the
tokens before them, so that a prompt that starts like an earlier one prefills only the rest."""
