# Totals of a `make robustness` log: one line per fault (histories passed of run) and one overall line, added up
# from each batch's "total:" line and each history's line.
/ history [0-9]+\/[0-9]+: / {
	fault = ""; result = ""
	for (i = 1; i <= NF; i++) {
		if ($i ~ /^fault=/) fault = substr($i, 7)
		if ($i ~ /^result=/) result = substr($i, 8)
	}
	if (fault != "") {
		ran[fault]++
		if (result == "PASS") passed[fault]++
		else other[fault] = other[fault] " " result
	}
}
/ total: histories=/ {
	line = $0
	gsub(/\(failed /, "failed=", line)
	gsub(/\)/, "", line)
	n = split(line, f, " ")
	for (i = 1; i <= n; i++) {
		if (split(f[i], kv, "=") == 2 && kv[2] ~ /^[0-9]+$/) {
			if (!(kv[1] in sum)) order[++keys] = kv[1]
			sum[kv[1]] += kv[2]
		}
	}
	batches++
}
END {
	for (fault in ran) printf "robustness by fault: %s %d/%d passed%s\n", fault, passed[fault], ran[fault], other[fault]
	out = sprintf("robustness total over %d batches:", batches)
	for (i = 1; i <= keys; i++) out = out " " order[i] "=" sum[order[i]]
	print out
	if (batches == 0) { print "robustness: no batch reported a total (see the log above)"; exit 1 }
}
