"""Jobs: a video or stream to analyse, run by whichever daemon holds its lease."""
