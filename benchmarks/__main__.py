from accel.benchmarks.cli import main

raise SystemExit(main())
