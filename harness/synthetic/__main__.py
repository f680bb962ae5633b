from harness.synthetic.cli import main

main()
