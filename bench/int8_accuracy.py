"""Kept for old instructions: the accuracy report now lives in ember.bench.int8_accuracy.

    python -m ember bench --suites int8_accuracy      # or: python -m ember.bench.int8_accuracy
"""
from ember.bench.int8_accuracy import main

if __name__ == "__main__":
    main()
