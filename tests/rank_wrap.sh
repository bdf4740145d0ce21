#!/bin/sh
# One rank's command under mlx.launch, keeping its pid, stdout, stderr and exit code in DIR
# by rank (mlx.launch may exit 0 when a rank failed).
dir=$1
# No stdin: mlx.launch's relay stops writing to a rank whose stdin is closed, and with that
# stops spinning (see start_ranks in test_distributed.py).
exec </dev/null
shift
"$@" > "$dir/out.$MLX_RANK" 2> "$dir/err.$MLX_RANK" &
child=$!
echo "$child" > "$dir/pid.$MLX_RANK"
wait "$child"
echo $? > "$dir/rc.$MLX_RANK"
