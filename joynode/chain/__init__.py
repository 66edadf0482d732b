"""JoyNet's contracts from the node's side: artifacts, a local chain, deployment,
committee selection, the watcher and the transaction sender."""
