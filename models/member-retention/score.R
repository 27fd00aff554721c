# member-retention: probability that a member renews (logistic regression fitted by glm).
#
# A batch model in base R + jsonlite meeting the model process contract: reads the CSV at
# $DATASET (header row, the declared feature columns in any order; the optional column
# distance_km may be absent or have empty cells), writes $RESULTS (header
# renewal_probability, one score per input row, in order), exits 0. Reads in chunks of
# CHUNK rows with fixed column classes, so memory stays flat on millions of rows.
suppressPackageStartupMessages(library(jsonlite))

CHUNK <- 200000L
truthy <- c("true", "t", "yes", "y", "1")
falsy <- c("false", "f", "no", "n", "0")
classes <- c(years_member = "numeric", visits_last_year = "numeric", tier = "character",
             auto_renew = "character", distance_km = "numeric")
optional <- "distance_km"

fail <- function(...) {
  message("member-retention: ", ...)
  quit(save = "no", status = 1)
}

p <- fromJSON("params.json")
tier_effect <- unlist(p$tier)

score <- function(d) {
  renew <- tolower(d$auto_renew)
  if (!all(renew %in% c(truthy, falsy))) fail("auto_renew must be true or false; got ", renew[!renew %in% c(truthy, falsy)][1])
  tier <- tier_effect[d$tier]
  if (anyNA(tier)) fail("tier must be one of ", paste(names(tier_effect), collapse = ", "), "; got ", d$tier[is.na(tier)][1])
  distance <- if ("distance_km" %in% names(d)) d$distance_km else rep(NA_real_, nrow(d))
  eta <- p$intercept + p$years_member * d$years_member + p$visits_last_year * d$visits_last_year +
    tier + p$auto_renew * (renew %in% truthy) +
    ifelse(is.na(distance), p$distance_missing, p$distance_km * distance)
  unname(plogis(eta))
}

main <- function() {
  dataset <- Sys.getenv("DATASET")
  results <- Sys.getenv("RESULTS")
  if (dataset == "" || results == "") fail("set DATASET (input CSV) and RESULTS (output CSV)")
  input <- file(dataset, open = "r")
  on.exit(close(input), add = TRUE)
  header <- scan(input, what = "", sep = ",", nlines = 1, quiet = TRUE)
  if (length(header) == 0) fail("the dataset is empty (no header row)")
  missing <- setdiff(setdiff(names(classes), optional), header)
  if (length(missing)) fail("the dataset has no column(s) ", paste(missing, collapse = ", "))
  col_classes <- ifelse(header %in% names(classes), classes[header], "NULL")
  output <- file(results, open = "w")
  on.exit(close(output), add = TRUE)
  writeLines("renewal_probability", output)
  repeat {
    d <- tryCatch(
      read.csv(input, header = FALSE, col.names = header, colClasses = col_classes, nrows = CHUNK,
               na.strings = "", comment.char = "", stringsAsFactors = FALSE, check.names = FALSE),
      error = function(e) if (grepl("no lines available", conditionMessage(e))) NULL else stop(e))
    if (is.null(d) || nrow(d) == 0) break
    for (req in setdiff(names(classes), optional)) {
      if (anyNA(d[[req]])) fail("column ", req, " has an empty value (it is required)")
    }
    writeLines(sprintf("%.6g", score(d)), output)
    if (nrow(d) < CHUNK) break
  }
}

tryCatch(main(), error = function(e) fail(conditionMessage(e)))
