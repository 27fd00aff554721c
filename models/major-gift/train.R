# Fits major-gift's logistic regression with glm; called by models/train.py.
# Usage: Rscript train.R TRAIN_CSV PARAMS_JSON
suppressPackageStartupMessages(library(jsonlite))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1], na.strings = "", stringsAsFactors = FALSE)
d$wealth_rating <- factor(d$wealth_rating, levels = c("A", "B", "C", "D", "E"))
d$wealth_rating <- relevel(d$wealth_rating, ref = "D")
# A missing optional value becomes 0 plus an indicator, exactly as serve.R scores it.
d$last_gift_missing <- as.numeric(is.na(d$last_gift_amount))
d$log_last_gift <- ifelse(is.na(d$last_gift_amount), 0, log1p(d$last_gift_amount))
d$volunteer <- as.numeric(tolower(d$volunteer) %in% c("true", "t", "yes", "y", "1"))
fit <- glm(major_gift ~ age + wealth_rating + events_attended + log_last_gift + last_gift_missing + volunteer,
           data = d, family = binomial())
b <- signif(coef(fit), 12)
rating <- c(A = 0, B = 0, C = 0, D = 0, E = 0)
for (lv in names(rating)) {
  key <- paste0("wealth_rating", lv)
  if (key %in% names(b)) rating[[lv]] <- unname(b[[key]])
}
params <- list(
  model = "logistic regression, glm(family = binomial) in models/major-gift/train.R",
  intercept = unname(b[["(Intercept)"]]),
  age = unname(b[["age"]]),
  wealth_rating = as.list(rating),
  events_attended = unname(b[["events_attended"]]),
  log_last_gift = unname(b[["log_last_gift"]]),
  last_gift_missing = unname(b[["last_gift_missing"]]),
  volunteer = unname(b[["volunteer"]]),
  training_rows = nrow(d),
  aic = signif(fit$aic, 10)
)
write(toJSON(params, auto_unbox = TRUE, digits = NA, pretty = TRUE), args[2])
