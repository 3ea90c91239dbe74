"""Long-context benchmark (issue: TTFT, decode, memory from 32K to 1M tokens, against a dense
Qwen3-8B-shaped model). The same as `sala-sglang bench`; see sala_sglang/bench.py.

    python benchmarks/long_context.py --model sala
    python benchmarks/long_context.py --model qwen3-8b --backend fa3 \
        --lengths 32768 65536 131072 262144 524288
    python benchmarks/plot_long_context.py   # PNGs and the README table from the results
"""

import sys

from sala_sglang.bench import main

if __name__ == "__main__":
    sys.exit(main())
