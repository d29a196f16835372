"""The agent: runs jobs the master hands it, each as a supervised process, and reports back."""
