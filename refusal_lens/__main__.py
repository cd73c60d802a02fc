from refusal_lens.cli import main

raise SystemExit(main())
