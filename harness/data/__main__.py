from harness.data.binidx import main

main()
