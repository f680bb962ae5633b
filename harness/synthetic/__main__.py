from harness.synthetic.train import main

main()
